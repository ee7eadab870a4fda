"""Training checkpoints to HuggingFace directories and back.

    python -m plait.launcher.export --checkpoint runs/tiny/checkpoints [--tag step200] \\
        --out hf/tiny [--dtype bf16] [--max-shard-size 2GB] [--tokenizer PATH]
    python -m plait.launcher.export --from-hf hf/tiny --out runs/imported/checkpoints

An export is a directory that ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(DIR)`` load: config.json (the
model config with every family option, ``auto_map``), the weights in HF names as safetensors
(sharded with an index above ``--max-shard-size``), the tokenizer as tokenizer.json (the
sentencepiece model converted exactly: normalisation, whitespace, byte fallback; the .model
file beside it), generation_config.json, and the self-contained modeling code of
``plait/launcher/hf_modeling`` (plain PyTorch, importing nothing from plait).

Because a checkpoint holds every parameter's full fp32 weight whatever layout wrote it
(launcher/checkpoint.py), an export of a (TP, CP, DP, ZeRO 0-2) run reads no optimizer state
and needs no process group. ZeRO-3 checkpoints are DeepSpeed's format and are refused with the
way round (resume under ZeRO-0..2 and save).

The import writes a weights-only checkpoint (the same format, ``kind: weights``, no moments,
no counters) that a run starts from with ``checkpoint.init_from=DIR``: a new run (step 0,
fresh optimizer and schedule) whose model begins with those weights.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from plait.models.common import ModelConfig
from plait.models.common.hf_export import from_hf, to_hf

from . import checkpoint
from .config import ConfigError, config_from_dict

CODE = Path(__file__).parent / "hf_modeling"
CODE_FILES = ("configuration_plait.py", "modeling_plait.py")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(RuntimeError):
    """A checkpoint or directory cannot be converted; the message says why and where."""


# ----------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: Path, tag: str = "") -> Path:
    """A checkpoint directory: ``path`` itself if it is one, else ``path/tag``, else the
    newest complete one under ``path``. Incomplete or corrupt ones are an error."""
    path = Path(path)
    if (path / checkpoint.META).is_file() or (path / checkpoint.COMPLETE).is_file():
        chosen = path
    elif tag:
        chosen = path / tag
        if not chosen.is_dir():
            have = sorted(p.name for p in path.glob("step*") if p.is_dir())
            raise ExportError(f"--tag {tag}: no {chosen}; checkpoints there: {have or 'none'}")
    else:
        found, problems = checkpoint.find_resumable(path)
        if found is None:
            why = "; ".join(problems) or "no checkpoint"
            raise ExportError(f"--checkpoint {path}: no complete checkpoint ({why})")
        chosen = found
    why = checkpoint.verify(chosen)
    if why:
        raise ExportError(f"{chosen}: not a complete checkpoint: {why}")
    return chosen


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 weights of a verified checkpoint (no optimizer moments) and its meta."""
    meta = json.loads((path / checkpoint.META).read_text())
    if meta.get("kind") == "deepspeed-zero3":
        raise ExportError(
            f"{path}: a ZeRO-3 checkpoint (DeepSpeed's format, tied to its layout); resume it "
            "with parallel.zero_stage=0, 1 or 2 for one step and export that checkpoint"
        )
    names = [k for k in meta["index"] if "::" not in k]
    state: dict[str, torch.Tensor] = {}
    files: dict[str, object] = {}
    for name in names:
        file = meta["index"][name]
        if file not in files:
            files[file] = safe_open(str(path / file), framework="pt")
        state[name] = files[file].get_tensor(name)
    return state, meta


def model_config(meta: dict, where: Path) -> tuple[ModelConfig, dict]:
    try:
        cfg = config_from_dict(meta["config"], f"{where}/meta.json")
    except ConfigError as e:
        raise ExportError(str(e)) from None
    return cfg.model, meta["config"]


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_path(run: dict, meta: dict, override: str) -> Path:
    """The run's sentencepiece model, checked against the checkpoint's fingerprint."""
    if override:
        path = Path(override)
    else:
        datasets = run["data"]["datasets"]
        data_dir = Path(datasets[0]) if datasets else Path(run["out_dir"]) / "data"
        path = data_dir / "tokenizer.model"
    if not path.is_file():
        raise ExportError(
            f"tokenizer: {path} does not exist (the run's data directory moved?); give "
            "--tokenizer PATH to the run's tokenizer.model"
        )
    want = meta.get("identity", {}).get("tokenizer_sha256", "")
    got = checkpoint._sha256(path)
    if want and got != want:
        raise ExportError(f"tokenizer: {path} is not the run's tokenizer (sha256 differs)")
    return path


def hf_tokenizer(spm_path: Path):
    """The sentencepiece model as a ``tokenizers`` tokenizer that encodes and decodes
    exactly as sentencepiece does (tested on the bundled corpus): NFKC by the model's own
    precompiled map, extra whitespace removed, the dummy prefix, byte fallback."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    proto = pb.ModelProto()
    proto.ParseFromString(spm_path.read_bytes())
    if proto.trainer_spec.model_type == pb.TrainerSpec.BPE:
        # transformers' converter rebuilds BPE merges from the pieces' scores
        from transformers import LlamaTokenizer

        with _TmpDir() as tmp:
            shutil.copy(spm_path, tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(
                json.dumps({"tokenizer_class": "LlamaTokenizer"})
            )
            tk = LlamaTokenizer.from_pretrained(str(tmp)).backend_tokenizer
    elif proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM:
        pieces = [(p.piece, p.score) for p in proto.pieces]
        tk = Tokenizer(Unigram(pieces, proto.trainer_spec.unk_id, byte_fallback=True))
    else:
        raise ExportError(f"tokenizer: {spm_path}: only BPE and unigram models convert")
    ns = proto.normalizer_spec
    steps = []
    if ns.precompiled_charsmap:
        steps.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tk.normalizer = normalizers.Sequence(steps)
    tk.pre_tokenizer = None
    tail = [decoders.Strip(" ", 1, 0)] if ns.add_dummy_prefix else []
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *tail]
    )
    special = {}
    spec = proto.trainer_spec
    ids = {"unk": spec.unk_id, "bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id}
    for role, pid in ids.items():
        if pid >= 0:
            special[f"{role}_token"] = proto.pieces[pid].piece
    # User-defined symbols (data.prepare.special_tokens) stay whole tokens; around them the
    # dummy-prefix rule differs from sentencepiece's (it marks the text after a symbol as a
    # new word), which the export reports.
    user = [p.piece for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED]
    if user:
        tk.add_tokens([AddedToken(u, normalized=False, special=False) for u in user])
        print(f"export: note: user-defined symbols {user} are whole tokens, but the text right "
              "after one may tokenize differently from sentencepiece (docs/export.md)")  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **special)
    tok.add_bos_token = False  # plait's documents are "text </s>", no <s>
    return tok


class _TmpDir:
    def __enter__(self) -> Path:
        import tempfile

        self.path = Path(tempfile.mkdtemp(prefix="plait-tok-"))
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ----------------------------------------------------------------------------- export


def hf_config(cfg: ModelConfig, vocab_size: int, run: dict, tok) -> dict:
    """config.json: plait's model fields under their own names, each family's options as a
    dict, and what transformers needs to find the code."""
    fields = model_fields(cfg, vocab_size)
    fields.update(
        max_position_embeddings=int(run["data"]["seq_len"]),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    return fields


def model_fields(cfg: ModelConfig, vocab_size: int) -> dict:
    """The PlaitConfig fields of a model config with a ``vocab_size``-row embedding."""
    fields = cfg.to_dict()
    for key in ("families", "preset", "num_layers", "vocab_multiple", "ffn_hidden_size"):
        fields.pop(key, None)
    tie = fields.pop("tie_embeddings")
    fields.update(
        model_type="plait",
        architectures=["PlaitForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_plait.PlaitConfig",
            "AutoModel": "modeling_plait.PlaitModel",
            "AutoModelForCausalLM": "modeling_plait.PlaitForCausalLM",
        },
        vocab_size=vocab_size,
        ffn_size=cfg.ffn_size,
        tie_word_embeddings=tie,
    )
    return fields


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise ExportError(f"--max-shard-size {text!r}: give a size such as 2GB or 500MB")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}
    return int(float(m.group(1)) * unit[m.group(2)])


def write_weights(hf: dict[str, torch.Tensor], out: Path, max_bytes: int, progress: bool):
    """``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json`` when the total exceeds ``max_bytes``."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(hf):
        n = hf[name].numel() * hf[name].element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    total = sum(t.numel() * t.element_size() for t in hf.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress)
    weight_map = {}
    for i, names in enumerate(groups):
        file = (
            "model.safetensors"
            if len(groups) == 1
            else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        save_file({k: hf[k].contiguous() for k in names}, str(out / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        bar.update(sum(hf[k].numel() * hf[k].element_size() for k in names))
    bar.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export(
    ckpt: Path,
    out: Path,
    tag: str = "",
    dtype: str = "fp32",
    max_shard_size: str = "5GB",
    tokenizer: str = "",
    progress: bool = True,
) -> Path:
    """Write the HF directory ``out`` from a training checkpoint; returns the checkpoint
    used. ``out`` is written beside and renamed into place, so a failed export leaves no
    half directory."""
    path = resolve_checkpoint(ckpt, tag)
    state, meta = read_weights(path)
    cfg, run = model_config(meta, path)
    spm_path = _tokenizer_path(run, meta, tokenizer)
    tok = hf_tokenizer(spm_path)
    try:
        hf = to_hf(state, cfg)
    except KeyError as e:  # an unknown family or a tensor no letter maps
        raise ExportError(f"{path}: cannot map to the HF layout: {e.args[0]}") from None
    hf = {k: v.to(DTYPES[dtype]) for k, v in hf.items()}
    vocab = state["embedding.weight"].shape[0]
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(hf, tmp, _parse_size(max_shard_size), progress)
    config = hf_config(cfg, vocab, run, tok)
    config["torch_dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    config["plait"] = {"checkpoint": str(path), "step": meta["step"], "layout": meta["layout"]}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tok.save_pretrained(str(tmp))
    shutil.copy(spm_path, tmp / "tokenizer.model")
    for name in CODE_FILES:
        shutil.copy(CODE / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return path


# ----------------------------------------------------------------------------- import


def read_hf(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"--from-hf {directory}: no config.json")
    config = json.loads(cfg_file.read_text())
    if config.get("model_type") != "plait":
        raise ExportError(
            f"--from-hf {directory}: model_type {config.get('model_type')!r}, not a plait export"
        )
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ExportError(f"--from-hf {directory}: no safetensors weights")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as r:
            for k in r.keys():  # noqa: SIM118
                hf[k] = r.get_tensor(k)
    return hf, config


def plait_model_config(config: dict) -> ModelConfig:
    """config.json's fields back into a ModelConfig (the inverse of ``hf_config``)."""
    model = {k: config[k] for k in ModelConfig().to_dict() if k in config}
    model.update(
        num_layers=len(config["pattern"]),
        ffn_hidden_size=config["ffn_size"],
        tie_embeddings=config.get("tie_word_embeddings", False),
        vocab_multiple=1,  # the exported table is already padded
    )
    try:
        return config_from_dict({"model": model}, "config.json").model
    except ConfigError as e:
        raise ExportError(str(e)) from None


def import_hf(directory: Path, out: Path) -> Path:
    """Write a weights-only checkpoint ``out/step0`` from an export; returns its path."""
    hf, config = read_hf(directory)
    cfg = plait_model_config(config)
    if cfg.tie_embeddings and "lm_head.weight" in hf:
        del hf["lm_head.weight"]  # transformers may write the tied copy
    try:
        state = from_hf({k: v.float() for k, v in hf.items()}, cfg)
    except KeyError as e:
        raise ExportError(f"--from-hf {directory}: missing tensor {e.args[0]}") from None
    return checkpoint.write_weights_only(Path(out), state, cfg, source=str(directory))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m plait.launcher.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", help="a checkpoint directory, or the run's checkpoint dir")
    p.add_argument("--tag", default="", help="which checkpoint (step<N>); default: the newest")
    p.add_argument("--from-hf", help="import: an exported HF directory")
    p.add_argument("--out", required=True, help="the HF directory (or checkpoint dir) to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--tokenizer", default="", help="the run's tokenizer.model, if it moved")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if bool(args.checkpoint) == bool(args.from_hf):
        p.error("give exactly one of --checkpoint and --from-hf")
    try:
        if args.from_hf:
            path = import_hf(Path(args.from_hf), Path(args.out))
            print(f"imported {args.from_hf} -> {path} (train from it: "
                  f"--set checkpoint.init_from={path})")  # fmt: skip
        else:
            path = export(Path(args.checkpoint), Path(args.out), args.tag, args.dtype,
                          args.max_shard_size, args.tokenizer, not args.no_progress)  # fmt: skip
            print(f"exported {path} -> {args.out}")
    except (ExportError, checkpoint.CheckpointError, FileNotFoundError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
