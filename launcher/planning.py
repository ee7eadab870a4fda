"""The layout a run would use, without training (``python -m plait.launcher.plan``): ranks,
pipeline stages cut by the letters' cost estimates, cost, parameters and memory per rank,
and the bubble. ``stage_bounds`` is the cut training uses too; the memory model is in the
command's help (launcher/plan.py)."""

from __future__ import annotations

from plait.models.common import cost as cost_model
from plait.models.common.layers import norm_params
from plait.parallel.stages import bubble_fraction, stage_layers

from .config import Config, ConfigError
from .layout import check_run

GIB = 1024**3


def layer_costs(cfg: Config) -> tuple[list[float], list[int]]:
    """Forward FLOPs per token and parameters of every block at the run's sequence length
    (plait.models.common.cost)."""
    m, T = cfg.model, cfg.data.seq_len
    layers = range(len(m.pattern))
    flops = [cost_model.block_flops(m, i, T) for i in layers]
    return flops, [cost_model.block_params(m, i) for i in layers]


def stage_bounds(cfg: Config, vocab: int = 0) -> list[tuple[int, int]]:
    """The layers of every model chunk (``pipeline_parallel x virtual_pipeline`` of them, in
    model order) a run uses: where ``|`` marks in the pattern cut it, else the cut that
    minimises the costliest chunk, the output layer counted on the last. Training and this
    planner call the same function."""
    p, m = cfg.parallel, cfg.model
    costs, _ = layer_costs(cfg)
    V = m.padded_vocab_size(vocab or m.vocab_size or cfg.data.prepare.vocab_size)
    marks = m.pipeline_marks if p.pipeline_parallel > 1 and m.pipeline_marks else None
    return stage_layers(costs, p.pipeline_parallel, p.virtual_pipeline, marks,
                        last_extra=cost_model.output_flops(m, V))


def plan(cfg: Config, world: int, precision: str = "bf16", vocab: int = 0) -> dict:
    p = cfg.parallel
    tp, pp, cp = p.tensor_parallel, p.pipeline_parallel, p.context_parallel
    if world % (tp * pp * cp):
        raise ConfigError(f"--world {world} is not a multiple of tp x pp x cp = {tp * pp * cp}")
    check_run(cfg, world)  # what training would refuse, refused here with the same line
    dp = world // (tp * pp * cp)
    m = cfg.model
    V = m.padded_vocab_size(vocab or m.vocab_size or cfg.data.prepare.vocab_size)
    costs, params = layer_costs(cfg)
    out_cost = cost_model.output_flops(m, V)
    stages = stage_bounds(cfg, V)
    vp, last = p.virtual_pipeline, len(stages) - 1
    wb = 2 if precision == "bf16" else 4
    opt_b = 12 if precision == "bf16" else 8
    micro = cfg.training.grad_accum
    s, b, h = cfg.data.seq_len, cfg.training.micro_batch_size, m.hidden_size
    act_layer = cost_model.activation_bytes(m, s, b, precision == "bf16", tp, cp)
    rows = []
    for k, (a, e) in enumerate(stages):
        n = sum(params[a:e]) + (V * h if k == 0 else 0)
        if k == last:  # a tied embedding is held again by the last stage (its output layer)
            n += norm_params(m) + (V * h if (not m.tie_embeddings or pp > 1) else 0)
        local = n / tp
        weights = local * wb / (dp if p.zero_stage == 3 else 1)
        grads = local * wb / (dp if p.zero_stage >= 2 else 1)
        optim = local * opt_b / (dp if p.zero_stage >= 1 else 1)
        acts = act_layer * (e - a) * min(pp - k % pp, micro)
        cost = sum(costs[a:e]) + (out_cost if k == last else 0)
        rows.append({"stage": k, "pp_rank": k % pp, "layers": (a, e), "letters": m.pattern[a:e],
                     "cost": cost, "params": n, "weights": weights, "grads": grads,
                     "optimizer": optim, "activations": acts})
    worst, least = max(r["cost"] for r in rows), min(r["cost"] for r in rows)
    return {"world": world, "tp": tp, "pp": pp, "cp": cp, "dp": dp, "vocab": V,
            "stages": rows, "imbalance": worst / least, "micro_batches": micro,
            "bubble": bubble_fraction(pp, micro, vp), "virtual": vp,
            "precision": precision}


def rank_coords(rank: int, tp: int, cp: int, dp: int) -> tuple[int, int, int, int]:
    """(tp, pp, cp, dp) of a rank in megatron-core's default order tp-cp-dp-pp (TP fastest)."""
    t, rest = rank % tp, rank // tp
    c, rest = rest % cp, rest // cp
    d, q = rest % dp, rest // dp
    return t, q, c, d


def render(cfg: Config, res: dict) -> str:
    tp, pp, cp, dp = res["tp"], res["pp"], res["cp"], res["dp"]
    lines = [f"{cfg.model.pattern} ({cfg.model.num_layers} layers, d={cfg.model.hidden_size}, "
             f"vocab {res['vocab']}) at {cfg.data.seq_len} tokens, micro-batch "
             f"{cfg.training.micro_batch_size}, {res['micro_batches']} micro-batches a step, "
             f"ZeRO-{cfg.parallel.zero_stage}, {res['precision']}",
             f"world {res['world']} = tp {tp} x pp {pp} x cp {cp} x dp {dp} "
             "(megatron order tp-cp-dp-pp: TP ranks adjacent)"]
    if res["world"] <= 32:
        lines.append("rank -> (tp, pp, cp, dp): " + ", ".join(
            f"{r}->{rank_coords(r, tp, cp, dp)}" for r in range(res["world"])))
    lines.append("stage (pp rank) | layers | letters | GFLOP/token | share | params | "
                 "GiB per rank: weights + grads + optimizer + activations = total")
    total = sum(r["cost"] for r in res["stages"])
    for r in res["stages"]:
        mem = (r["weights"], r["grads"], r["optimizer"], r["activations"])
        extra = (" +embedding" if r["stage"] == 0 else "") + (
            " +output" if r["stage"] == len(res["stages"]) - 1 else ""
        )
        lines.append(
            f"{r['stage']} ({r['pp_rank']}) | {r['layers'][0]}-{r['layers'][1] - 1} | "
            f"{r['letters']}{extra} | "
            f"{r['cost'] / 1e9:.3f} | {r['cost'] / total:.0%} | {r['params'] / 1e6:.1f}M | "
            + " + ".join(f"{x / GIB:.2f}" for x in mem)
            + f" = {sum(mem) / GIB:.2f}"
        )
    lines.append(f"balance: costliest / cheapest stage = {res['imbalance']:.2f}x")
    v = res["virtual"]
    if v > 1:
        for q in range(pp):
            mine = [r for r in res["stages"] if r["pp_rank"] == q]
            tot = sum(r[k] for r in mine for k in ("weights", "grads", "optimizer", "activations"))
            lines.append(f"pp rank {q}: chunks {[r['stage'] for r in mine]}, {tot / GIB:.2f} GiB")
    formula = "(p-1)/(m+p-1)" if v == 1 else f"(p-1)/(v m+p-1), v={v}"
    lines.append(f"pipeline bubble: {formula} = {res['bubble']:.1%} "
                 f"({pp} stages, {res['micro_batches']} micro-batches)")
    return "\n".join(lines)
