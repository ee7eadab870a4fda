"""Training checkpoints to HuggingFace directories and back (``python -m
plait.launcher.export``, whose help says what an export holds): the export with its
self-check (launcher/export_check.py), the sentencepiece tokenizer as ``tokenizer.json``, and
the import of an export into a weights-only checkpoint.

Because a checkpoint holds every parameter's full fp32 weight whatever layout wrote it
(launcher/checkpoint/), an export reads no optimizer state and needs no process group.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from plait.data.tokenizer import FILES as TOKENIZER_FILES
from plait.data.tokenizer import Tokenizer as PlaitTokenizer
from plait.data.tokenizer import TokenizerError
from plait.errors import UserError
from plait.models.common import ModelConfig, family, hf_code
from plait.models.common.config import ModelConfigError
from plait.models.common.hf_export import NativeLayout, from_hf, to_hf

from . import checkpoint, export_check
from .config import ConfigError, config_from_dict
from .rundir import check_writable_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(UserError, RuntimeError):
    """A checkpoint or directory cannot be converted; the message says why and where."""


# ----------------------------------------------------------------------------- checkpoints


def check_out(out: Path, export: bool) -> None:
    """Refuse an output that cannot be written, before any work: a file, a directory that
    cannot be created or written, or (it would be replaced whole) an existing directory that
    is not an export of plait's (``export``) or holds anything but checkpoints."""
    check_writable_dir(out, "--out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if export:
        config = out / "config.json"
        try:
            mine = json.loads(config.read_text()).get("model_type") == "plait"
        except (OSError, ValueError, AttributeError):
            mine = False
        if not mine:
            raise ExportError(f"--out {out} exists and is not a plait export (it would be "
                              "replaced whole); give a new directory")


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 weights of a verified checkpoint (no optimizer moments) and its meta."""
    meta = checkpoint.read_meta(path)
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
    """The checkpoint's model config and its run config (a weights-only checkpoint, as the
    import writes, has the model alone: the run config is then the defaults around it)."""
    try:
        cfg = config_from_dict(checkpoint.saved_config(meta), f"{where}/meta.json")
    except ConfigError as e:
        raise ExportError(str(e)) from None
    return cfg.model, cfg.to_dict() if meta["kind"] != "logical" else meta["config"]


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_path(run: dict, meta: dict, override: str, ckpt: Path) -> Path:
    """The run's tokenizer (a sentencepiece model or a tokenizer.json), checked against the
    checkpoint's fingerprint: the one ``--tokenizer`` names, the one an import keeps beside
    its weights, or the run's data's."""
    from plait.data.tokenizer import tokenizer_in

    if override:
        path = Path(override)
    elif any((ckpt / name).is_file() for name in TOKENIZER_FILES):
        path = tokenizer_in(ckpt)
    else:
        datasets = run["data"]["datasets"]
        data_dir = Path(datasets[0]) if datasets else Path(run["out_dir"]) / "data"
        path = tokenizer_in(data_dir)
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
    """The run's tokenizer for transformers. A tokenizer.json (an imported release's) as it
    is, with its document separator as eos and pad. A sentencepiece model as a
    ``tokenizers`` tokenizer that encodes and decodes exactly as sentencepiece does (tested
    on the bundled corpus): NFKC by the model's own precompiled map, extra whitespace
    removed, the dummy prefix, byte fallback."""
    from transformers import PreTrainedTokenizerFast

    try:
        own = PlaitTokenizer(spm_path)
    except TokenizerError as e:
        raise ExportError(f"tokenizer: {e}") from None
    if own.kind == "tokenizers":
        return PreTrainedTokenizerFast(tokenizer_object=own.hf, eos_token=own.eos_token,
                                       pad_token=own.eos_token)
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram

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
              "after one may tokenize differently from sentencepiece (docs/export.md)")
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


def native_layout(cfg: ModelConfig) -> NativeLayout | None:
    """The transformers class a model exports to natively: the one of the family owning
    its letters, when that class can express the model (``NativeLayout.fits``); else None
    (plait's own layout and code)."""
    owners = {family.family_of(c).name for c in cfg.pattern}
    if len(owners) != 1:
        return None
    native = family.families()[owners.pop()].native
    return native if native is not None and not native.fits(cfg) else None


def hf_config(cfg: ModelConfig, vocab_size: int, run: dict, tok,
              native: NativeLayout | None = None) -> dict:
    """config.json: the native class's fields (``native``), or plait's model fields under
    their own names with each family's options as a dict and what transformers needs to
    find the code; the token ids and training length either way."""
    fields = native.config_to_hf(cfg, vocab_size) if native else model_fields(cfg, vocab_size)
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
    verify: bool = True,
    verify_tokens: int = export_check.TOKENS,
) -> Path:
    """Write the HF directory ``out`` from a training checkpoint; returns the checkpoint
    used. ``out`` is written beside and renamed into place, so a failed export leaves no
    half directory. ``verify``: before the rename, transformers loads the directory in a
    process without plait and must compute plait's logits and greedy decode
    (launcher/export_check.py, ``verify_tokens`` tokens), or ExportError leaves nothing."""
    if verify and verify_tokens < 2:
        raise ExportError(f"--verify-tokens {verify_tokens}: give at least 2")
    out = Path(out).absolute()  # the check's process runs elsewhere
    check_out(out, export=True)
    path = checkpoint.resolve(ckpt, tag)
    state, meta = read_weights(path)
    cfg, run = model_config(meta, path)
    spm_path = _tokenizer_path(run, meta, tokenizer, path)
    tok = hf_tokenizer(spm_path)
    native = native_layout(cfg)
    try:
        hf = native.to_hf(state, cfg) if native else to_hf(state, cfg)
    except KeyError as e:  # an unknown family or a tensor no letter maps
        raise ExportError(f"{path}: cannot map to the HF layout: {e.args[0]}") from None
    hf = {k: v.to(DTYPES[dtype]) for k, v in hf.items()}
    vocab = state["embedding.weight"].shape[0]
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:  # whatever fails below, no temporary directory is left beside --out
        write_weights(hf, tmp, _parse_size(max_shard_size), progress)
        params = sum(v.numel() for v in hf.values())
        del hf  # the check holds a model of its own; not this copy as well
        config = hf_config(cfg, vocab, run, tok, native)
        config["torch_dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
        config["plait"] = {"checkpoint": str(path), "step": meta["step"],
                           "layout": meta.get("layout"), "source": meta.get("source"),
                           "pattern": cfg.pattern}
        (tmp / "config.json").write_text(json.dumps(_json_floats(config), indent=2) + "\n")
        generation = {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tok.save_pretrained(str(tmp))
        if spm_path.suffix != ".json":
            shutil.copy(spm_path, tmp / "tokenizer.model")
        if native is None:
            hf_code.write_code(tmp, cfg.pattern)  # plait's and each family's modeling code
        result = None
        if verify:
            try:
                result = export_check.verify(
                    tmp, state, cfg, DTYPES[dtype], spm_path, out, verify_tokens,
                    remote_code=native is None,
                )
            except export_check.CheckFailed as e:
                raise ExportError(str(e)) from None
            print(result.line(), flush=True)
        export_check.record(tmp, result, dtype, params)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return path


# ----------------------------------------------------------------------------- import


def read_hf(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """An export's config.json and its weights, from ``*.safetensors`` only (a pickled
    ``pytorch_model.bin`` beside them is never opened)."""
    directory = Path(directory)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"--from-hf {directory}: no config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ExportError(f"--from-hf {cfg_file}: not valid JSON ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "plait" and native_for(kind) is None:
        known = ", ".join(["plait", *native_types()])
        raise ExportError(f"--from-hf {directory}: model_type {kind!r} is not one plait "
                          f"imports ({known})")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ExportError(f"--from-hf {directory}: no safetensors weights")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as r:
                for k in r.keys():  # noqa: SIM118
                    hf[k] = r.get_tensor(k)
        except Exception as e:  # safetensors' own error type for a malformed file
            raise ExportError(f"--from-hf {f}: not a safetensors file ({e})") from None
    return hf, config


def native_types() -> list[str]:
    return [t for f in family.families().values() if f.native for t in f.native.model_types]


def native_for(model_type: str | None) -> NativeLayout | None:
    """The native layout that imports config.json's ``model_type`` (None: none does)."""
    for fam in family.families().values():
        if fam.native is not None and model_type in fam.native.model_types:
            return fam.native
    return None


def _json_floats(x):
    """config.json's non-finite floats as transformers writes them, ``{"__float__":
    "Infinity"}`` (Bamba's time_step_limit), instead of JSON's missing Infinity."""
    if isinstance(x, dict):
        return {k: _json_floats(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_floats(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": "Infinity" if x > 0 else ("-Infinity" if x < 0 else "NaN")}
    return x


def plait_model_config(config: dict, where: str = "config.json") -> ModelConfig:
    """config.json's fields back into a ModelConfig (the inverse of ``hf_config``)."""
    missing = [k for k in ("pattern", "ffn_size") if k not in config]
    if missing:
        raise ExportError(f"--from-hf {where}: no {', '.join(missing)} (not written by plait)")
    model = {k: config[k] for k in ModelConfig().to_dict() if k in config}
    model.update(
        num_layers=len(config["pattern"]),
        ffn_hidden_size=config["ffn_size"],
        tie_embeddings=config.get("tie_word_embeddings", False),
        vocab_multiple=1,  # the exported table is already padded
    )
    try:
        return config_from_dict({"model": model}, where).model
    except ConfigError as e:
        raise ExportError(str(e)) from None


def import_hf(directory: Path, out: Path) -> Path:
    """Write a weights-only checkpoint ``out/step0`` from an export, with the export's
    tokenizer.model beside the weights (what an export of it, or an evaluation, uses);
    returns its path."""
    directory, out = Path(directory), Path(out)
    check_out(out, export=False)
    hf, config = read_hf(directory)
    where = str(directory / "config.json")
    native = native_for(config.get("model_type"))
    if native is None:
        cfg = plait_model_config(config, where)
    else:
        try:
            cfg = native.config_from_hf(config, where)
            cfg.validate(family.catalogue())
        except ModelConfigError as e:
            raise ExportError(f"--from-hf {e}" if str(e).startswith(where) else
                              f"--from-hf {where}: {e}") from None
    if cfg.tie_embeddings and "lm_head.weight" in hf:
        del hf["lm_head.weight"]  # transformers may write the tied copy
    try:
        hf = {k: v.float() for k, v in hf.items()}
        state = native.from_hf(hf, cfg) if native else from_hf(hf, cfg)
    except KeyError as e:
        raise ExportError(f"--from-hf {directory}: missing tensor {e.args[0]}") from None
    extra = {}
    for name in TOKENIZER_FILES:  # the export's or the release's own tokenizer
        if (directory / name).is_file():
            try:
                PlaitTokenizer(directory / name)
            except TokenizerError as e:
                raise ExportError(f"--from-hf {e}") from None
            extra = {name: directory / name}
            break
    seq_len = config.get("max_position_embeddings")
    return checkpoint.write_weights_only(out, state, cfg, source=str(directory), files=extra,
                                         seq_len=seq_len)
