"""Pipeline stages (megatron-core's schedules under a DeepSpeed engine) equal the single
process: per-step losses and every weight after 4 optimizer steps, through the launcher's own
code (``build_stages``, ``build_engine``, ``train_step``), fp32, 4 gloo ranks.

Layouts: (PP=2, TP=2), (PP=2, CP=2: LASP-2 and LASP-2H), (PP=2, DP=2, ZeRO-1), (TP=2, CP=2)
and (PP=2, CP=2) with Gated DeltaNet layers, and PP=4 with
two virtual stages per rank (interleaved 1F1B), with tied and untied embeddings, AdamW and
LAMB, more micro-batches than stages, a pattern with lightning, softmax and Based layers.
Tolerance: 1e-6 relative for losses and weights (fp32 summation order differs between the
layouts: TP's all-reduce, ZeRO's flat partitions, LASP's chunked states; measured figures in
the report of the pipeline issue are ~1e-7).

Initial weights are not loaded into the stages: each stage builds its layers from the first
stage's RNG state, so the equality also checks that a pipelined run starts where a single
process does."""

from __future__ import annotations

import pytest
import torch

from plait.launcher.config import Config
from plait.models.common import ModelConfig
from plait.parallel.config import ParallelConfig
from tests.distributed import run_distributed
from tests.helpers import rel_err

VOCAB, T, STEPS = 96, 32, 4
TOL = 1e-6
LOOSE = 1e-4


class FakeLoader:
    """Deterministic micro batches: global micro batch j has ``rows`` rows; a data-parallel
    rank reads its own slice (so DP=2 x micro 2 equals DP=1 x micro 4). Two documents a row."""

    def __init__(self, micro: int, dp: int, dp_rank: int):
        self.micro, self.dp, self.dp_rank, self.j = micro, dp, dp_rank, 0

    def next_micro_batch(self) -> dict[str, torch.Tensor]:
        rows = self.micro * self.dp
        g = torch.Generator().manual_seed(500 + self.j)
        self.j += 1
        tok = torch.randint(0, VOCAB, (rows, T + 1), generator=g)
        cut = torch.randint(5, T - 5, (rows, 1), generator=g)
        pos = torch.arange(T).expand(rows, T)
        second = pos >= cut
        b = {"tokens": tok[:, :-1], "labels": tok[:, 1:],
             "positions": torch.where(second, pos - cut, pos),
             "doc_ids": second.long() + 2 * torch.arange(rows)[:, None]}
        sl = slice(self.dp_rank * self.micro, (self.dp_rank + 1) * self.micro)
        return {k: v[sl] for k, v in b.items()}


def _cfg(pattern: str, opt: str, tied: bool, pp=1, tp=1, cp=1, vp=1, zero=0, micro=2,
         accum=4) -> Config:
    cfg = Config()
    heads = 8 if "M" in pattern else 4
    layers = len(pattern.replace("|", ""))
    cfg.model = ModelConfig(pattern=pattern, num_layers=layers, hidden_size=32, num_heads=heads,
                            ffn_hidden_size=64, lightning_block=8, tie_embeddings=tied,
                            vocab_multiple=32)
    # A head whose A starts large forgets its state within a token: its A_log gradient is
    # rounding noise, which Adam's normalisation turns into full-size updates of either sign
    # (measured 4e-4 and 3.5e-3 relative in A_log under TP=2 / CP=2 with losses equal to the
    # last bit). Decays in [0.01, 1] keep every head's gradient real.
    cfg.model.gdn.a_init_max = 1.0
    cfg.model.mamba2.chunk, cfg.model.mamba2.attn_kv_heads = 8, 2
    cfg.parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp,
                                  virtual_pipeline=vp, zero_stage=zero)
    o = cfg.optimizer
    o.name, o.lr, o.min_lr, o.warmup_steps = opt, 1e-2, 1e-3, 2
    o.weight_decay, o.grad_clip = 0.1, 1.0
    t = cfg.training
    t.micro_batch_size, t.grad_accum, t.steps, t.precision = micro, accum, STEPS, "fp32"
    cfg.data.seq_len = T
    cfg.validate()
    return cfg


def _train(rt, cfg: Config):
    from plait.launcher.engine import build_engine
    from plait.launcher.layout import sequence_parallel_context
    from plait.launcher.loop import Loop
    from plait.launcher.trainer import build_stages
    from plait.models.common import build_model
    from plait.parallel.pipeline import PipelineRunner
    from plait.parallel.tensor_parallel import gather_full

    sp = sequence_parallel_context(cfg)
    pipe = None
    if rt.pp > 1:
        model, chunks = build_stages(cfg, rt, VOCAB, sp)
    else:
        model = build_model(cfg.model, rt.tp, vocab_size=VOCAB, sp=sp)
    initial = gather_full(model)
    engine, _, scheduler = build_engine(model, cfg, rt)
    if rt.pp > 1:
        pipe = PipelineRunner(
            chunks, engine, cfg.model.hidden_size, cfg.parallel.zero_stage, cfg.optimizer.grad_clip
        )
    loader = FakeLoader(cfg.training.micro_batch_size, rt.dp, rt.dp_rank)
    loop = Loop(cfg, rt, engine, scheduler, loader, sp=sp, pipe=pipe)
    steps = [loop.step() for _ in range(STEPS)]
    return {"losses": [s.loss for s in steps], "parts": [s.parts for s in steps],
            "grad_norms": [s.grad_norm for s in steps], "initial": initial,
            "weights": gather_full(model)}


_REFERENCES: dict[tuple, dict] = {}


def _reference(pattern, opt, tied, accum=4, **layout) -> dict:
    """The run without pipeline stages: a single process, or (``layout``) TP or CP alone."""
    key = (pattern, opt, tied, accum, tuple(sorted(layout.items())))
    if key not in _REFERENCES:
        cfg = _cfg(pattern, opt, tied, accum=accum, **layout)
        world = cfg.parallel.tensor_parallel * cfg.parallel.context_parallel
        _REFERENCES[key] = _merged(run_distributed(_train, world, cfg, parallel=cfg.parallel))
    return _REFERENCES[key]


def _merge(results: list[dict], key: str) -> dict[str, torch.Tensor]:
    """The whole model's tensors from every rank's (a stage's) share; copies held by several
    ranks (TP/DP/CP replicas, the tied embedding on two stages) must agree exactly."""
    out: dict[str, torch.Tensor] = {}
    for r in results:
        for name, t in r[key].items():
            if name in out:
                assert rel_err(t, out[name]) <= TOL, f"{name} differs between ranks"
            else:
                out[name] = t
    return out


def _merged(results: list[dict]) -> dict:
    for r in results:  # every rank reports the last stage's loss and the global norm
        assert r["losses"] == results[0]["losses"] and r["parts"] == results[0]["parts"]
    return {**results[0], "initial": _merge(results, "initial"),
            "weights": _merge(results, "weights")}


def _check(res: dict, ref: dict, tol: float) -> dict:
    errs = {"loss": max(abs(a - b) / abs(b) for a, b in zip(res["losses"], ref["losses"]))}
    assert res["losses"] == pytest.approx(ref["losses"], rel=tol)
    for got, want in zip(res["parts"], ref["parts"]):  # lm_loss, moh_balance: every stage's
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=tol), k
    assert res["initial"].keys() == ref["initial"].keys()
    for k, v in ref["initial"].items():
        assert torch.equal(res["initial"][k], v), f"initial {k} differs from the single process"
    weights = res["weights"]
    assert weights.keys() == ref["weights"].keys()
    errs["weights"] = max(rel_err(weights[k], v) for k, v in ref["weights"].items())
    for k, v in ref["weights"].items():
        assert rel_err(weights[k], ref["initial"][k]) > 1e-4, f"{k} did not train"
        assert rel_err(weights[k], v) <= tol, f"{k}: {rel_err(weights[k], v):.2e}"
    for a, b in zip(res["grad_norms"], ref["grad_norms"]):
        if b == b:  # DeepSpeed reports no norm at ZeRO-0 (nan)
            assert a == pytest.approx(b, rel=10 * tol)
    return errs


LAYOUTS = {
    # name: (pattern, optimizer, tied, layout kwargs, the same layout without stages)
    "pp2_tp2_tied_lamb": ("LABL", "lamb", True, dict(pp=2, tp=2), {}),
    "pp2_tp2_untied_adamw": ("LABL", "adamw", False, dict(pp=2, tp=2), dict(tp=2)),
    "pp2_cp2_tied_lamb": ("LABL", "lamb", True, dict(pp=2, cp=2), {}),
    # stages cut by hand ('|' in the pattern; ignored without stages)
    "pp2_dp2_zero1_untied_lamb": ("LAB|L", "lamb", False, dict(pp=2, zero=1, micro=1), {}),
    "pp4_vp2_tied_lamb": ("LABLLABL", "lamb", True, dict(pp=4, vp=2, accum=8), {}),
    # MoH layers on both stages (8 heads: 2 shared, top 2 of 6 routed, so the balance loss
    # has a gradient): it counts once per layer, logged and trained
    "pp2_tp2_moh_untied_adamw": ("MLAM", "adamw", False, dict(pp=2, tp=2), dict(tp=2)),
    # Gated DeltaNet (state passing and the conv halo over CP, key/value heads over TP) beside
    # plait's and Qwen3.5's softmax attention
    "tp2_cp2_gdn_lamb": ("GAQG", "lamb", False, dict(tp=2, cp=2), {}),
    "pp2_cp2_gdn_tied_lamb": ("GQ|GA", "lamb", True, dict(pp=2, cp=2), {}),
    # Mamba-2 (heads over TP with B and C replicated and one norm group across the ranks)
    # beside Bamba's and plait's attention; PP=2 x CP=2 "DA|RD" measured by hand
    # (docs/parallelism.md), CP itself in tests/models/test_sequence_parallel_model.py
    "pp2_tp2_mamba2_lamb": ("DR|DA", "lamb", False, dict(pp=2, tp=2), {}),
}


TOLERANCE = {"pp2_cp2_gdn_tied_lamb": 5e-6, "pp2_tp2_mamba2_lamb": 5e-6}
"""Layouts compared looser than TOL: the delta rule's unit-triangular solves and the
state-passing combine round differently from the single process (measured 1.5e-6 in
``b_proj`` after 4 steps; TP=2 x CP=2 without stages: 3.7e-7). Mamba-2 under TP=2: 1.75e-6
in R's ``v_proj`` after 4 steps, the same with TP=2 alone (the pipeline adds 7.6e-8); the
first step's gradients are within 4.5e-6 of the single process's (A_log's, a reverse running
sum of differences) and 1e-6 elsewhere."""


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_equals_single_process(name):
    """Against the single process at 1e-6 (LAMB). With AdamW, TP=2 or CP=2 alone, without
    stages, is already ~2e-5 / ~4e-6 off the single process in the weights after 4 steps (the
    layouts' fp32 summation order, amplified by Adam's per-element normalisation of gradients
    that nearly cancel): those runs are compared at 1e-6 with that layout without stages
    (what the pipeline adds) and at 1e-4 with the single process. (PP=2 x CP=2 with AdamW,
    measured: 3.4e-6 from the single process, 1.3e-6 from CP=2 alone; with LAMB 9e-8.)"""
    pattern, opt, tied, kw, base = LAYOUTS[name]
    accum = kw.get("accum", 4)
    cfg = _cfg(pattern, opt, tied, **kw)
    res = _merged(run_distributed(_train, 4, cfg, parallel=cfg.parallel))
    single = _reference(pattern, opt, tied, accum=accum)
    errs = _check(res, single, LOOSE if base else TOLERANCE.get(name, TOL))
    line = f"{name}: vs single process loss {errs['loss']:.1e} weights {errs['weights']:.1e}"
    if base:
        errs = _check(res, _reference(pattern, opt, tied, accum=accum, **base), TOL)
        line += f"; vs {base} loss {errs['loss']:.1e} weights {errs['weights']:.1e}"
    print(line)
