"""Programs the lightning state kernels launch at batch 1 and the 1B presets' 8K tokens, in the
sequential sweep and the chunk-parallel form, against an H100's 132 SMs (no GPU needed: the
grids are the wrappers' own arithmetic, kernels/lightning/triton.py ``plan`` and
``state_form``).

    .venv/bin/python benchmarks/state_grid.py          # prints and writes docs/benchmarks.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_section  # noqa: E402

H100_SMS = 132

# (preset, what runs the lightning kernel, heads, D, E): heads and widths of each preset's
# state layers (models/*/presets; D x E as kernels/aot.py's shape tables): TransNormerLLM's
# 16 heads of 128; Based's 16 heads of 1 + 16 + 136 = 153 features x 112 + 1 values; Mamba-2's
# heads of 64 channels with a 128-wide state, 2 x hidden / 64 of them.
SHAPES = (
    ("transnormer-1b", "L", 16, 128, 128),
    ("based-1.3b", "B", 16, 153, 113),
    ("mamba2-1b", "D", 64, 128, 64),
    ("bamba-9b", "D", 128, 128, 64),
)


def rows(T: int = 8192, B: int = 1, sms: int = H100_SMS) -> list[dict]:
    import torch
    import triton

    from plait.kernels.lightning import triton as lt

    out = []
    for preset, letter, H, D, E in SHAPES:
        meta = lt.plan(D, E, torch.bfloat16, 64, interpret=False)
        NT = triton.cdiv(T, meta["BT"])
        tiles = triton.cdiv(D, meta["BK"]) * triton.cdiv(E, meta["BV"])
        out.append(dict(
            preset=preset, letter=letter, H=H, D=D, E=E, BK=meta["BK"], BV=meta["BV"], NT=NT,
            sweep=B * H * tiles, local=B * H * tiles * NT,
            combine=B * H * triton.cdiv(D * E, lt.COMBINE_BLOCK),
            chosen=lt.state_form(B, H, D, E, NT, meta),  # sm_count(): 132 without a GPU
        ))
    return out


def table(rs: list[dict], sms: int = H100_SMS) -> str:
    lines = [
        "| preset (layer) | heads x D x E | tiles (BK x BV) | chunks | sequential sweep: "
        "programs (x SMs) | chunk-parallel: local states / combine (x SMs) | the wrapper picks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rs:
        lines.append(
            f"| {r['preset']} ({r['letter']}) | {r['H']} x {r['D']} x {r['E']} "
            f"| {r['sweep'] // r['H']} ({r['BK']} x {r['BV']}) | {r['NT']} "
            f"| {r['sweep']:,} ({r['sweep'] / sms:.2f}x) "
            f"| {r['local']:,} ({r['local'] / sms:.0f}x) / {r['combine']:,} "
            f"({r['combine'] / sms:.1f}x) | {r['chosen']} |")
    return "\n".join(lines)


def main() -> None:
    from plait.kernels.lightning.triton import COMBINE_BLOCK

    rs = rows()
    body = f"""## Lightning state kernels at batch 1: programs per launch

`.venv/bin/python benchmarks/state_grid.py`: the grids of `_state_fwd` / `_dstate_bwd` (the
sequential sweep: one program per state tile and head walks every chunk in turn) and of the
chunk-parallel form (`_chunk_local`: every chunk's own state at once; `_combine`: the carry
across chunks, {COMBINE_BLOCK} state entries per program), bf16, B = 1, T = 8192, 64-token
chunks, against an H100's {H100_SMS} SMs. The wrapper (`state_form`) takes the parallel form
where the sweep launches fewer than twice the SMs and there are at least 4 chunks; the two
forms are equal under the interpreter (tests/kernels/test_lightning_state_forms.py). The
same choice serves LASP-2's chunk state (`lightning_chunk_state_triton`). Arithmetic, not a
GPU measurement.

{table(rs)}
"""
    write_section("state-grid", body)
    print(body)


if __name__ == "__main__":
    main()
