"""Token-mixing operators.

Each operator lives in its own sub-package with the same three files:
``naive.py`` (the obviously-correct reference), ``chunk.py`` (the fast path on CPU,
chunked PyTorch) and, once written, ``triton.py`` (the fast path on CUDA). The package's
``__init__`` exposes one function that the models call; it picks the path.

kernels/ stands on the ground of the house plan: it imports torch (and triton) only,
never the rest of plait, and knows nothing of process groups.
"""
