"""Checkpoints a cluster can trust: one logical tensor per parameter, written atomically,
loadable under any (TP, CP, DP, ZeRO stage) layout.

Why plait writes its own format rather than calling DeepSpeed's ``save_checkpoint``: that
writer pickles (loading needs ``torch.load(weights_only=False)``), fsyncs nothing and writes
``latest`` before its final barrier, so a pointer can name a half-written checkpoint; its
files hold TP shards and ZeRO partitions tied to the layout that wrote them, and its
resharding route (the universal-checkpoint converter) fails on megatron-core's
``_extra_state`` entries and supports neither ZeRO-0 nor optimizers whose state is not Adam's
(measured with DeepSpeed 0.19.8; docs/checkpoints.md). The logical format sidesteps all of
it: whatever wrote it, a checkpoint holds each parameter's full fp32 master weight and its
optimizer moments as plain tensors (safetensors: no pickle, lazy slicing), and every layout
reads its own TP slice and hands ZeRO its own partition.

A checkpoint ``<dir>/step<N>/``:
    shard-00000.safetensors ...  ``<param>`` (fp32 master weight), ``<param>::exp_avg``,
                                 ``<param>::exp_avg_sq``, in files of at most ~1 GiB
    rng-<rank>.safetensors       that rank's RNG states (torch, CUDA, numpy, python, megatron's
                                 model-parallel tracker), restored only under the same layout
    meta.json                    counters, LR schedule, loader position, layout, config,
                                 fingerprints, optimizer step, tensor index, file sizes and
                                 sha256
    COMPLETE                     written last, holds meta.json's sha256
``<dir>/latest`` names the newest complete one; it is replaced (write, fsync, rename) only
after every rank finished writing and the directory was renamed into place.

What a save does: gather (DP all-reduce of the ZeRO fragments, TP all-gather), rank 0 writes
the shards into ``.tmp-step<N>`` as it goes, every rank its RNG file, fsync, barrier, rank 0
writes meta.json and COMPLETE, renames the directory, moves ``latest``, prunes
(``checkpoint.keep_last``, ``checkpoint.keep_every``; a failed delete is reported, never
fatal). A process killed anywhere in this leaves either the old ``latest`` or the new, and a
``.tmp-*`` directory that resume reports and never reads.

Asynchronous saves (``checkpoint.async_save``, ``Saver``): everything collective (the gathers,
the barriers, every rank's RNG file) and the capture of every counter still happen at the step
boundary; rank 0 then keeps CPU copies of the gathered tensors and a background thread does
the rest in the same order (shards, fsync, meta.json, COMPLETE, rename, ``latest``, prune)
while training continues. One save at most is in flight: the next save and the end of the run
wait for it, collectively, so no rank counts a checkpoint done before rank 0 wrote it, and an
error in the writer is raised there on every rank.

The gathers and the redistribution to a layout live in plait.parallel.engine_state (with
the DeepSpeed internals they read); this package is files, order and checks:
    format.py    file names, the error type, durable writes (fsync, atomic replace),
                 sha256, what each kind of meta.json holds, ``verify``
    rng.py       every RNG state as tensors (``rng-<rank>.safetensors``)
    identity.py  what must agree to resume (``RunIdentity``, ``check_fits``) and the layout
    saving.py    the save: collective capture, rank 0's ``_Finish``, ``Saver`` (synchronous
                 or asynchronous), ``save``, ``write_weights_only``
    finding.py   ``find_resumable``, ``resolve``, ``resolve_init``, ``prune``
    loading.py   ``load`` into an engine under any layout, ``init_weights_from``,
                 ``check_shapes``
The names the rest of plait uses are re-exported here (``checkpoint.Saver``, ...); a test
that patches one of them patches what code outside this package calls, while a module in
it calls its neighbours' functions directly (patch ``checkpoint.<module>.<name>`` for that).
Fault injection for the kill and overlap tests: plait.launcher.faults.
"""

from __future__ import annotations

from .finding import find_resumable, prune, resolve, resolve_init
from .format import (
    COMPLETE,
    FORMAT,
    KINDS,
    LATEST,
    META,
    REFUSED,
    CheckpointError,
    read_meta,
    saved_config,
    verify,
)
from .format import _sha256 as _sha256  # launcher/convert.py and tests hash files with it
from .identity import TOKENIZER_FIELDS, RunIdentity, check_fits, run_identity
from .loading import _Reader as _Reader  # tests read a checkpoint's tensors with it
from .loading import check_shapes, init_weights_from, load
from .saving import SHARD_BYTES, Saver, save, write_weights_only
from .saving import _Finish as _Finish  # tests make rank 0's writer fail through it

__all__ = [
    "COMPLETE",
    "FORMAT",
    "KINDS",
    "LATEST",
    "META",
    "REFUSED",
    "SHARD_BYTES",
    "TOKENIZER_FIELDS",
    "CheckpointError",
    "RunIdentity",
    "Saver",
    "check_fits",
    "check_shapes",
    "find_resumable",
    "init_weights_from",
    "load",
    "prune",
    "read_meta",
    "resolve",
    "resolve_init",
    "run_identity",
    "save",
    "saved_config",
    "verify",
    "write_weights_only",
]
