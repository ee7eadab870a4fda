"""A whole tiny hybrid under sequence parallelism (x tensor parallelism) equals the
single-process model: the loss and every parameter gradient, with documents crossing the
rank borders. Each context-parallel rank computes the mean loss of its chunk; the full
loss is the mean over ranks (equal token counts), and so is the gradient, which is what
DeepSpeed's averaging over the DP x CP group does."""

import pytest
import torch
import torch.distributed as dist

from plait.models.common import ModelConfig, build_model
from plait.parallel.config import ParallelConfig
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import gather_full, load_full_state
from tests.distributed import run_distributed

VOCAB, T = 200, 48  # 24 or 12 tokens per rank: not multiples of the lightning block (16)


def _cfg(pattern="LALA"):
    cfg = ModelConfig(
        pattern=pattern, num_layers=len(pattern), hidden_size=64, num_heads=4, ffn_hidden_size=96,
        lightning_block=16, lightning_norm="full", lrpe="first",
    )
    # windows and kernels that cross the rank borders (12 tokens per rank at CP=4)
    cfg.based.window, cfg.based.feature_dim, cfg.h3.state_size = 9, 8, 10
    cfg.moh.shared_heads, cfg.moh.top_k = 1, 2
    cfg.seqboat.zdim, cfg.seqboat.window = 8, 4  # compressed chunks cross the rank borders
    cfg.mamba2.chunk, cfg.mamba2.attn_kv_heads = 16, 2  # one group of B, C for 8 heads
    return cfg


def _batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, T + 1), generator=g)
    starts = torch.zeros(2, T, dtype=torch.bool)
    starts[0, [9, 24, 30]] = True  # one start exactly at the 2-rank border (24)
    starts[1, [13, 40]] = True
    doc_ids = starts.long().cumsum(1)
    pos = torch.arange(T).expand(2, T).clone()
    for b in range(2):
        last = 0
        for t in range(T):
            if starts[b, t]:
                last = t
            pos[b, t] = t - last
    return tokens[:, :-1], tokens[:, 1:], doc_ids, pos


def _run(rt, full_state, pattern="LALA", softmax="lasp2h", zigzag=False):
    from megatron.core import parallel_state as ps

    sp = SequenceParallel.from_parallel_state(softmax, zigzag)
    model = build_model(_cfg(pattern), rt.tp, vocab_size=VOCAB, sp=sp)
    if full_state is not None:
        load_full_state(model, full_state)
    x, y, docs, pos = _batch()
    sl = sp.local_index(T)
    loss = model(x[:, sl], y[:, sl], positions_BT=pos[:, sl], doc_ids_BT=docs[:, sl])
    loss.backward()
    grads = gather_full(model, grads=True)
    if sp.world > 1:  # the gradient of the mean over ranks
        cp = ps.get_context_parallel_group()
        for g in grads.values():
            dist.all_reduce(g, group=cp)
            g /= sp.world
        loss_t = loss.detach().clone()
        dist.all_reduce(loss_t, group=cp)
        loss = loss_t / sp.world
    return {"state": gather_full(model), "loss": loss.item(), "grads": grads}


@pytest.mark.parametrize(
    "tp,cp,pattern,softmax,zigzag",
    [
        (1, 2, "LALA", "lasp2h", False),
        (2, 2, "LALA", "lasp2h", False),
        (1, 4, "LALA", "lasp2h", False),
        (1, 2, "LALA", "ring", False),
        (2, 2, "AA", "ring", True),
        (1, 2, "BWCH", "lasp2h", False),
        (1, 4, "HMBW", "lasp2h", False),
        (2, 2, "LMCH", "ring", False),
        (1, 2, "LS", "lasp2h", False),
        (1, 4, "SAS", "lasp2h", False),
        (2, 2, "SM", "lasp2h", False),
        (1, 4, "GQG", "lasp2h", False),
        (2, 2, "QG", "ring", False),
        (1, 4, "DRD", "lasp2h", False),
        (2, 2, "RD", "ring", False),
    ],
)
def test_sequence_parallel_model_equals_single_process(tp, cp, pattern, softmax, zigzag):
    ref = run_distributed(_run, 1, None, pattern, seed=3)[0]
    outs = run_distributed(
        _run, tp * cp, ref["state"], pattern, softmax, zigzag,
        parallel=ParallelConfig(tensor_parallel=tp, context_parallel=cp), seed=3,
    )
    for out in outs:
        assert abs(out["loss"] - ref["loss"]) < 1e-5, (out["loss"], ref["loss"])
        for name, g in ref["grads"].items():
            torch.testing.assert_close(out["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
