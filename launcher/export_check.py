"""The export checks itself: before an export is renamed into place, transformers loads it
in a process that cannot import plait and must compute what plait computes.

``export()`` (launcher/export.py) calls ``verify`` on the finished temporary directory, then
``record``. Two sides see the same tokens:

* transformers (``export_check_hf.py``, run as ``python -I -S`` with only the site-packages
  directories on its path, plait refused): ``AutoModelForCausalLM.from_pretrained(DIR,
  trust_remote_code=True, dtype=float32)`` - the logits of one forward over ``tokens`` ids
  (default 256, one row), one cached greedy ``generate()`` of ``NEW`` tokens after the first
  ``PROMPT`` (eos disabled) with the logits of each of its steps, and the sample text encoded
  by ``AutoTokenizer``;
* plait, here: the model built from the checkpoint's config with the checkpoint's weights
  rounded through the export dtype (a bf16 export is compared with plait on the same
  bf16-rounded weights; both sides compute in float32) - its forward logits, its own greedy
  decode (``HybridLM.greedy``: prefill and decode steps) and the forward logits of the
  prompt plus that continuation (the logits each greedy step chose from).

What fails the export (each one line, with the numbers):

* the logits' max abs difference above ``REL_TOL`` times the logits' scale (the largest
  logit plait produced, at least 1); the same bound on ``generate()``'s step logits while the
  two continuations agree;
* a greedy token that differs where it is not a tie: plait's logit for transformers' token
  within twice the tolerance of plait's chosen one (two logits each off by up to the
  tolerance can swap exactly then) is a tie, and the comparison stops there, since the
  contexts differ after it;
* the shipped tokenizer encoding the sample text differently from sentencepiece;
* the checking process failing (its last error line) or plait's own logits not being finite.

Top-1 agreement is reported; under the logit bound a top-1 difference can only be a tie.

Tokens: documents of the bundled corpus (data/corpus) encoded with the export's tokenizer,
each followed by eos as plait packs them for training. Real text rather than random ids
because a trained model's greedy choices on text it models have margins, so the greedy
comparison is decisive rather than a string of near-ties; the same ids for every export
with the same tokenizer; and the shipped tokenizer is checked on them too. Ids drawn with a
fixed seed stand in where the corpus is absent or too short for the count asked for.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from plait.data.corpus import BUNDLED_CORPUS
from plait.data.tokenizer import Tokenizer
from plait.errors import UserError
from plait.models.common import ModelConfig, build_model
from plait.models.common.family import letter
from plait.parallel.single import NotAlone, single_process

HF_SCRIPT = Path(__file__).with_name("export_check_hf.py")
TOKENS = 256
PROMPT = 64
NEW = 16
REL_TOL = 1e-3
"""Max abs logit difference allowed, relative to the largest logit plait produced (at least
1, so a near-uniform model is not held to a tighter bound than a unit-scale one). Both sides
compute in float32 on the same weights, so what differs is the order of summation (chunked
against recurrent linear attention, FFT against recurrent long convolutions, SDPA against
step-by-step softmax, top-k routing decided on slightly different scores). Measured
(docs/export.md, 256 tokens): 3e-7 relative on trained tiny models; on each family's
1B-class preset with perturbed random weights 3e-7 (transnormer-1b), 7e-7 (seqboat-1b),
7e-6 (based-1.3b), 1.3e-5 (moh-1b) and 5e-5 (h3-1.3b, its FFT convolutions) - so 1e-3 keeps
20x above the worst. Faults in a trained model land far above it: on the demo model (tiny,
200 steps) a 1% error in the softmax temperature gives 1.9e-3, a 10% one 1.8e-2, an
off-by-one lightning decay 2.5e-2, a flipped rotary sign 8e-2, bf16 weights compared with
unrounded ones 2.4e-3, a flipped sign in a mixer 1.1."""
TIMEOUT_S = 3600


class CheckFailed(UserError, RuntimeError):
    """The export does not compute what plait computes, or could not be checked."""


@dataclass
class CheckResult:
    """What the check compared and found; recorded in config.json and README.md."""

    tokens: int
    source: str
    """"corpus" (the bundled corpus, encoded) or "random" (ids drawn with seed 0)."""
    max_abs_diff: float
    logit_scale: float
    tolerance: float
    top1_agreement: float
    step_max_abs_diff: float
    greedy_prompt: int
    greedy_new: int
    greedy_equal: int
    """Leading greedy tokens equal (greedy_new when all are)."""
    greedy_tie_at: int | None
    """Where the continuations part at a tie (0-based), if they do."""
    tokenizer_equal: bool | None
    """None where the tokens were random ids (no text to encode)."""
    seconds: float
    transformers: str
    torch: str

    def line(self) -> str:
        greedy = f"greedy {self.greedy_equal}/{self.greedy_new} tokens equal"
        if self.greedy_tie_at is not None:
            greedy += f" (then a tie at token {self.greedy_tie_at})"
        tok = {True: ", tokenizer equal", False: ", tokenizer differs", None: ""}
        return (
            f"export check: passed: {self.tokens} tokens ({self.source}), logits max abs diff "
            f"{self.max_abs_diff:.1e} (tolerance {self.tolerance:.1e}), top-1 "
            f"{100 * self.top1_agreement:.1f}%, {greedy}{tok[self.tokenizer_equal]}, "
            f"{self.seconds:.1f} s (transformers {self.transformers})"
        )


# ----------------------------------------------------------------------------- tokens


def sample_tokens(spm_path: Path, n: int) -> tuple[list[int], list[str], str]:
    """``n`` token ids, the texts they encode (empty for random ids) and their source."""
    tok = Tokenizer(spm_path)
    ids: list[int] = []
    texts: list[str] = []
    if BUNDLED_CORPUS.is_file():
        with BUNDLED_CORPUS.open(encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                texts.append(text)
                ids += tok.encode(text) + [tok.eos_id]
                if len(ids) >= n:
                    return ids[:n], texts, "corpus"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, tok.vocab_size, (n,), generator=g).tolist(), [], "random"


# ----------------------------------------------------------------------------- plait side


@torch.no_grad()
def plait_reference(
    state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype, tokens: list[int],
    prompt: int, new: int,
) -> dict[str, torch.Tensor]:
    """plait's logits [T, V], greedy continuation [new] and the logits its steps chose from
    [new, V], with the weights rounded through ``dtype`` and computed in float32."""
    ids = torch.tensor([tokens])
    with single_process(), torch.random.fork_rng():
        model = build_model(cfg, 1, vocab_size=state["embedding.weight"].shape[0]).eval()
        for name, p in model.named_parameters():
            if name not in state:
                raise CheckFailed(f"export check: the checkpoint has no tensor {name!r}")
            p.copy_(state[name].to(dtype))  # rounded, then back to the float32 parameter
        logits = model(ids)[0].float()
        greedy = model.greedy(ids[:, :prompt], new)[0]
        seq = torch.cat([ids[0, :prompt], greedy])[None]
        steps = model(seq)[0, prompt - 1 : prompt - 1 + new].float()
        del model
    return {"logits": logits, "greedy": greedy, "step_logits": steps}


# ----------------------------------------------------------------------------- HF side


def site_dirs() -> list[str]:
    """Where this interpreter finds transformers and its dependencies: the directories
    holding torch, transformers, tokenizers and safetensors, and the site-packages."""
    dirs: list[str] = []
    for mod in ("transformers", "torch", "tokenizers", "safetensors", "huggingface_hub"):
        spec = importlib.util.find_spec(mod)
        if spec is not None and spec.submodule_search_locations:
            dirs.append(str(Path(next(iter(spec.submodule_search_locations))).parent))
    dirs += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def run_hf(directory: Path, job: dict, work: Path) -> dict:
    """Run export_check_hf.py on ``directory`` in a fresh interpreter; what it saved."""
    job = dict(job, directory=str(directory), out=str(work / "hf.pt"))
    (work / "job.json").write_text(json.dumps(job))
    cmd = [sys.executable, "-I", "-S", str(HF_SCRIPT), str(work / "job.json"), *site_dirs()]
    # The remote code is copied into a modules cache of its own: concurrent exports do not
    # race on the user's cache, and nothing is left in it.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"export check: transformers did not finish in {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [x.strip() for x in (proc.stderr or proc.stdout).splitlines() if x.strip()]
        last = lines[-1] if lines else "no output"
        if proc.returncode < 0:
            last = f"killed by signal {-proc.returncode} (out of memory?); {last}"
        raise CheckFailed(f"export check: loading the export in transformers failed: {last}")
    return torch.load(work / "hf.pt")


# ----------------------------------------------------------------------------- compare


def compare(
    ref: dict, hf: dict, spm_ids: list[list[int]], prompt: int, source: str, seconds: float
) -> tuple[CheckResult | None, list[str]]:
    """The result and what failed (empty when the export passes; no result where the
    logits cannot even be compared)."""
    p, h = ref["logits"], hf["logits"]
    if not torch.isfinite(p).all():
        raise CheckFailed("export check: plait's own logits are not finite (the checkpoint?)")
    if h.shape != p.shape:
        return None, [f"the logits have shape {tuple(h.shape)}, not {tuple(p.shape)}"]
    problems = []
    scale = max(1.0, p.abs().max().item())
    tol = REL_TOL * scale
    diff = _max_abs(h, p)
    if not diff <= tol:
        problems.append(f"logits differ by {diff:.1e} (max abs, tolerance {tol:.1e})")
    top1 = (h.argmax(-1) == p.argmax(-1)).float().mean().item()

    ours, theirs = ref["greedy"], hf["greedy"]
    new = len(ours)
    part = next((i for i in range(min(new, len(theirs))) if theirs[i] != ours[i]),
                min(new, len(theirs)))
    # the step logits are comparable while both continuations saw the same context
    k = min(part + 1, new, len(hf["step_logits"]))
    step_diff = _max_abs(hf["step_logits"][:k], ref["step_logits"][:k]) if k else 0.0
    if not step_diff <= tol:
        problems.append(f"generate()'s step logits differ by {step_diff:.1e} (max abs)")
    tie_at = None
    if part < min(new, len(theirs)):
        step = ref["step_logits"][part]
        if (step[ours[part]] - step[theirs[part]]).item() <= 2 * tol:
            tie_at = part
        else:
            problems.append(f"the greedy continuation differs at token {part}")
    elif len(theirs) != new:
        problems.append(f"generate() gave {len(theirs)} new tokens, not {new}")

    tok_equal = None
    if spm_ids:
        tok_equal = hf["encoded"] == spm_ids
        if not tok_equal:
            i = next(i for i, (a, b) in enumerate(zip(hf["encoded"], spm_ids)) if a != b)
            problems.append(f"the tokenizer encodes corpus document {i} differently")
    result = CheckResult(
        tokens=p.shape[0], source=source, max_abs_diff=diff, logit_scale=scale, tolerance=tol,
        top1_agreement=top1, step_max_abs_diff=step_diff, greedy_prompt=prompt,
        greedy_new=new, greedy_equal=part, greedy_tie_at=tie_at, tokenizer_equal=tok_equal,
        seconds=round(seconds, 2), transformers=hf["transformers"], torch=hf["torch"],
    )
    return result, problems


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference; inf where either side is not finite (a NaN would read as a
    number in the message)."""
    d = (a - b).abs().max().item()
    return d if math.isfinite(d) else math.inf


# ----------------------------------------------------------------------------- verify


def verify(
    directory: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype,
    spm_path: Path, out: Path, tokens: int = TOKENS, remote_code: bool = True,
) -> CheckResult:
    """Check the export in ``directory`` (``out``'s temporary twin) against plait's model
    on ``state``; raises CheckFailed with one line when it does not compute the same."""
    t0 = time.perf_counter()
    ids, texts, source = sample_tokens(spm_path, tokens)
    prompt, new = min(PROMPT, tokens // 2), NEW
    spm = Tokenizer(spm_path)
    spm_ids = [spm.encode(t) for t in texts]
    print(f"export check: plait's forward on {tokens} tokens and greedy decode of {new} ...",
          flush=True)
    try:
        ref = plait_reference(state, cfg, dtype, ids, prompt, new)
    except NotAlone as e:
        raise CheckFailed(
            f"export check: {e}; export in a process of its own, or pass --no-verify"
        ) from None
    print("export check: the same in transformers, in a process without plait ...", flush=True)
    work = Path(tempfile.mkdtemp(prefix="plait-export-check-"))
    try:
        job = {"tokens": ids, "prompt": prompt, "new": new, "texts": texts,
               "remote_code": remote_code}
        hf = run_hf(directory, job, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result, problems = compare(ref, hf, spm_ids, prompt, source, time.perf_counter() - t0)
    if problems:
        raise CheckFailed(
            f"export check: {' and '.join(problems)}; nothing was written to {out}; "
            "--no-verify skips the check"
        )
    return result


# ----------------------------------------------------------------------------- record


def record(directory: Path, result: CheckResult | None, dtype: str, params: int) -> None:
    """The check's result into config.json (``plait.verified``: the numbers, or false
    under --no-verify) and a model card, README.md."""
    cfg_file = directory / "config.json"
    config = json.loads(cfg_file.read_text())
    config["plait"]["verified"] = asdict(result) if result is not None else False
    cfg_file.write_text(json.dumps(config, indent=2) + "\n")
    (directory / "README.md").write_text(model_card(config, result, dtype, params))


def model_card(config: dict, result: CheckResult | None, dtype: str, params: int) -> str:
    """README.md: what the export is, where it came from, how it was verified, how to load."""
    src = config["plait"]
    pattern = src["pattern"]
    native = "auto_map" not in config  # a class transformers ships: no remote code
    kinds = "; ".join(f"{c}: {letter(c).description}" for c in dict.fromkeys(pattern))
    if result is None:
        checked = ("Not verified: exported with `--no-verify` (`plait.verified` is false in "
                   "config.json).")
    else:
        weights = "weights" if dtype == "fp32" else f"{dtype}-rounded weights"
        greedy = f"{result.greedy_equal} of {result.greedy_new} tokens equal"
        if result.greedy_tie_at is not None:
            greedy += f", then a tie at token {result.greedy_tie_at} (plait's two candidates "
            greedy += "within twice the tolerance; the contexts differ after it)"
        tok = ""
        if result.tokenizer_equal:
            tok = " The shipped tokenizer encoded the sample text as sentencepiece does."
        checked = (
            f"Checked when it was written (`plait.verified` in config.json): loaded by "
            f"transformers {result.transformers} (torch {result.torch}) in a process that "
            f"could not import plait, in float32, and compared with plait's own model on the "
            f"same {weights}, also in float32. On {result.tokens} tokens "
            f"({'the bundled corpus' if result.source == 'corpus' else 'random ids'}): "
            f"logits within {result.max_abs_diff:.1e} (max abs; largest logit "
            f"{result.logit_scale:.1f}, tolerance {result.tolerance:.1e}), top-1 agreement "
            f"{100 * result.top1_agreement:.1f}%; a cached greedy `generate()` of "
            f"{result.greedy_new} tokens after a {result.greedy_prompt}-token prompt against "
            f"plait's greedy decode: {greedy}.{tok} ({result.seconds:.1f} s)"
        )
    heads = config.get("num_heads", config.get("num_attention_heads"))
    length = config["max_position_embeddings"]
    remote = "False" if native else "True"
    if native:
        code = (f"The layout is transformers' own `{config['architectures'][0]}`: it loads "
                "without remote code.")
    else:
        code = ("The modeling code is in this directory (`modeling_plait.py`, plain PyTorch, "
                "no plait needed), so loading needs `trust_remote_code=True`.")
    tags = "- plait" if native else "- plait\n- custom_code"
    return f"""---
library_name: transformers
tags:
{tags}
---

# plait {pattern} ({params / 1e6:.1f}M parameters)

A hybrid language model trained with plait and exported for HuggingFace transformers: layer
pattern `{pattern}` ({kinds}), hidden size {config["hidden_size"]}, {heads} heads,
vocabulary {config["vocab_size"]}, trained on sequences of {length} tokens. Weights in {dtype}.
{code}

- source: `{src["checkpoint"]}`, step {src["step"]}

## Verification

{checked}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("path/to/this/directory", trust_remote_code={remote})
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory", trust_remote_code={remote})
ids = tok("ABSURDITY, n.", return_tensors="pt")
print(tok.decode(model.generate(**ids, max_new_tokens=40, do_sample=False)[0]))
```

The tokenizer adds no `<s>`: plait's documents are `text </s>`.
"""
