"""Long-context evaluation (launcher/evaluate.py): per-position loss averaged with its counts is
the mean validation loss; TP=2 and CP=2 give the single-process figures; passkey and MQAR
probes score what they should; the CLI writes its JSON, plots and TensorBoard events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.data.loader import ArrayTokens, PackedSequences, SequenceLoader
from plait.launcher.evaluation import _answers_right, bucket_edges, position_loss
from plait.models.common import ModelConfig, build_model
from plait.parallel.config import ParallelConfig
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import gather_full, load_full_state
from tests.distributed import run_distributed
from tests.launcher.test_train_job import _run, _tiny
from tests.models.test_decode import perturb

REPO = Path(__file__).resolve().parents[2]
VOCAB, EOS = 96, 2


def _cfg() -> ModelConfig:
    cfg = ModelConfig(pattern="LAWM", num_layers=4, hidden_size=32, num_heads=4,
                      ffn_hidden_size=64, lightning_block=8)
    cfg.based.window, cfg.moh.shared_heads = 6, 2
    return cfg


def _source(seed: int = 0) -> ArrayTokens:
    """Documents of uneven lengths (an EOS ends each)."""
    tokens = np.random.default_rng(seed).integers(3, VOCAB, 4000)
    tokens[np.random.default_rng(seed + 1).choice(4000, 60, replace=False)] = EOS
    return ArrayTokens(tokens, EOS)


def _weights():
    torch.manual_seed(0)
    model = build_model(_cfg(), 1, vocab_size=VOCAB)
    perturb(model, 0)
    return gather_full(model)


def _job(rt, full, masking: bool):
    sp = SequenceParallel.from_parallel_state()
    model = build_model(_cfg(), rt.tp, vocab_size=VOCAB, sp=sp).eval()
    load_full_state(model, full)
    res = position_loss(model, _source(), 64, 2, 3, rt, sp, masking)
    # the mean validation loss as the training loop computes it, over the same batches
    loader = SequenceLoader(PackedSequences(_source(), 64, 0, shuffle=False), 2, rt.dp,
                            rt.dp_rank)
    means = []
    if rt.cp == 1:
        with torch.no_grad():
            for _ in range(3):
                b = loader.next_micro_batch()
                if masking:
                    loss = model(b["tokens"], b["labels"], None, b["positions"], b["doc_ids"])
                else:
                    loss = model(b["tokens"], b["labels"])
                means.append(loss.item())
    return res, means


@pytest.mark.parametrize("masking", [True, False])
def test_position_loss_is_the_validation_loss_and_layout_free(masking):
    full = run_distributed(lambda rt: _weights(), 1)[0]
    one, means = run_distributed(_job, 1, full, masking)[0]
    assert one.edges == bucket_edges(64) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert sum(one.count) == 3 * 2 * 64
    assert one.mean == pytest.approx(float(np.mean(means)), rel=1e-6)
    if masking:  # positions restart in every document: early buckets hold several tokens
        assert one.count[0] > 6
    else:
        assert one.count[:3] == [6, 6, 12]
    for layout in (ParallelConfig(tensor_parallel=2), ParallelConfig(context_parallel=2)):
        got = run_distributed(_job, 2, full, masking, parallel=layout)[0][0]
        assert got.count == one.count, layout
        for a, b in zip(got.loss_sum, one.loss_sum):
            assert a == pytest.approx(b, rel=1e-5), layout


def _greedy(rt, full, prefix):
    model = build_model(_cfg(), 1, vocab_size=VOCAB).eval()
    load_full_state(model, full)
    return model.greedy(prefix, 5)


def test_answers_right_scores_teacher_forced_argmax():
    """Rows whose 5 answer tokens are the model's greedy continuation count as right; all
    answers off, or one of five off, count as wrong; under TP=2 and CP=2 alike."""
    full = run_distributed(lambda rt: _weights(), 1)[0]
    prefix = torch.from_numpy(np.random.default_rng(3).integers(3, VOCAB, (3, 21)))
    cont = run_distributed(_greedy, 1, full, prefix)[0]
    seq = torch.cat([prefix, cont, prefix[:, :6]], 1)  # 32 tokens, answers at 21..25
    seq[1, 21:26] = (cont[1] + 1) % VOCAB
    seq[2, 23] = (cont[2, 2] + 1) % VOCAB
    mask = torch.zeros(3, 32)
    mask[:, 20:25] = 1  # predictions at 20..24 score tokens 21..25

    def job(rt):
        sp = SequenceParallel.from_parallel_state()
        model = build_model(_cfg(), rt.tp, vocab_size=VOCAB, sp=sp).eval()
        load_full_state(model, full)
        return _answers_right(model, seq, mask, rt, sp)

    for world, layout in ((1, ParallelConfig()), (2, ParallelConfig(tensor_parallel=2)),
                          (2, ParallelConfig(context_parallel=2))):
        right = run_distributed(job, world, parallel=layout)[0]
        assert right.tolist() == [1.0, 0.0, 0.0], layout


def test_cli_writes_results_plots_and_tensorboard(tmp_path):
    run = tmp_path / "run"
    _run(_tiny(run, "training.steps=3", "training.eval_every=0", "data.seq_len=128"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "plait.launcher.evaluate", "--checkpoint",
           str(run / "checkpoints"), "--lengths", "1,2", "--batches", "1",
           "--passkey-samples", "2", "--passkey-depths", "0,1", "--mqar-pairs", "4",
           "--tensorboard", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "eval" / "step3"
    res = json.loads((out / "eval.json").read_text())
    assert [p["length"] for p in res["positions"]] == [128, 256]
    assert set(res["passkey"]["accuracy"]) == {"128@0.0", "128@1.0", "256@0.0", "256@1.0"}
    assert 0.0 <= res["mqar"]["accuracy"] <= 1.0
    assert (out / "loss_by_position.png").is_file() and (out / "passkey.png").is_file()
    assert len(list((run / "tensorboard").glob("events.*"))) >= 2  # training's and ours
    assert "passkey accuracy" in proc.stdout
    bad = subprocess.run([*cmd[:4], str(tmp_path / "none")], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_training_chunks_continue_positions_without_document_masking():
    """The training loop's context-parallel slicing: without document masking a rank's chunk
    carries the window's own positions (rank 1 of 2 holds 4..7), with it the restarting ones."""
    from plait.launcher.loop import _local

    class SecondOfTwo:
        world = 2

        def local_index(self, T):
            return torch.arange(T // 2, T)

    b = {"tokens": torch.zeros(1, 8, dtype=torch.long),
         "positions": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])}
    assert _local(b, SecondOfTwo(), masking=False)["positions"].tolist() == [[4, 5, 6, 7]]
    assert _local(b, SecondOfTwo(), masking=True)["positions"].tolist() == [[1, 0, 1, 2]]
