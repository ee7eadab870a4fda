"""Test-session setup.

* Single-threaded torch in the parent too: forked ranks inherit it, and two cores shared by
  2-4 ranks thrash otherwise.
* megatron-core (~8 s to import) is imported once here, before any rank is forked.
* TRITON_INTERPRET=1 must be set before any @triton.jit runs (Triton kernels are tested on
  CPU under the interpreter).
"""

import os
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

import megatron.core  # noqa: E402,F401
import megatron.core.tensor_parallel  # noqa: E402,F401
