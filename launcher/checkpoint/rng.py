"""Every random generator a rank draws from, as plain tensors (a checkpoint's
``rng-<rank>.safetensors``): torch, CUDA, numpy, python, and megatron-core's model-parallel
tracker. A checkpoint restores them only under the layout that saved them
(``loading._restore_rng``); under another the ranks do not correspond."""

from __future__ import annotations

import random

import numpy as np
import torch


def _rng_state() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    out["numpy.rest"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    out["python.state"] = torch.tensor(internal, dtype=torch.int64)
    out["python.version"] = torch.tensor([version], dtype=torch.int64)
    out["python.gauss"] = torch.tensor(
        [float("nan") if gauss_next is None else gauss_next], dtype=torch.float64
    )
    for k, s in get_cuda_rng_tracker().get_states().items():
        out[f"tracker.{k}"] = s
    return {k: v.contiguous() for k, v in out.items()}


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    pos, has_gauss = state["numpy.rest"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss,
         float(state["numpy.gauss"][0]))
    )
    g = float(state["python.gauss"][0])
    random.setstate(
        (int(state["python.version"][0]), tuple(state["python.state"].tolist()),
         None if g != g else g)
    )
    tracker = {k[len("tracker.") :]: v for k, v in state.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
