"""Causal attention within packed documents (letter A's single-rank operator): the
per-document path equals the dense-mask reference (outputs and gradients, fp32 against
float64, rel 1e-5) for documents of uneven lengths, length-1 documents and rows whose
boundaries differ; it never builds a mask; the CUDA varlen path's packing is checked with a
CPU stand-in for flash attention's kernel."""

import pytest
import torch
import torch.nn.functional as F

import plait.kernels.attention.varlen as varlen_mod
from plait.kernels.attention import causal_attention, causal_attention_naive
from plait.kernels.docs import cu_seqlens_from_doc_ids, document_lengths
from tests.helpers import check_against_reference

TOL = 1e-5


def _docs(rows: list[list[int]]) -> torch.Tensor:
    """[B, T] doc ids from per-row document lengths (ids continue across rows)."""
    out, first = [], 0
    for lengths in rows:
        out.append(
            torch.repeat_interleave(torch.arange(len(lengths)) + first, torch.tensor(lengths))
        )
        first += len(lengths)
    return torch.stack(out)


# rows of T = 37 tokens: uneven documents, length-1 documents (also first and last), rows with
# different boundaries, one row that is a single document, rows sharing their boundaries
LAYOUTS = {
    "uneven": [[11, 1, 20, 5], [1, 1, 30, 1, 4], [37]],
    "shared": [[5, 1, 1, 30], [5, 1, 1, 30]],
    "ones": [[1] * 37],
    "one_doc": [[37], [36, 1]],
}


def _inputs(seed, B, H=2, T=37, D=16, E=8):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    v, do = (torch.randn(B, H, T, E, generator=g) for _ in range(2))
    return q, k, v, do


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_segments_match_dense_mask_reference(seed, layout):
    docs = _docs(LAYOUTS[layout])
    q, k, v, do = _inputs(seed, docs.shape[0])
    check_against_reference(
        lambda q, k, v: causal_attention(q, k, v, doc_ids=docs, backend="segments"),
        lambda q, k, v: causal_attention_naive(q, k, v, docs),
        (q, k, v), do, "qkv", TOL,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_on_cpu_is_per_document_without_a_mask(seed, monkeypatch):
    """One maskless causal call per document (the shared-boundary batch cut at once), with
    the non-contiguous [B, H, T, D] views the head projections hand over; scale honoured."""
    docs = _docs(LAYOUTS["uneven"])
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(3, 37, 2, 3 * 16, generator=g).transpose(1, 2)  # HeadProjections.split
    q, k, v = fused.split(16, dim=-1)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append(kw.get("attn_mask"))
        return real(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    got = causal_attention(q, k, v, doc_ids=docs, scale=0.3)
    assert len(calls) == sum(len(r) for r in LAYOUTS["uneven"])
    assert all(m is None for m in calls)
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    want = causal_attention_naive(q.double(), k.double(), v.double(), docs, scale=0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_cu_seqlens_and_no_documents():
    docs = _docs(LAYOUTS["uneven"])
    q, k, v, _ = _inputs(0, 3)
    cu = cu_seqlens_from_doc_ids(docs)
    torch.testing.assert_close(
        causal_attention(q, k, v, cu_seqlens=cu), causal_attention(q, k, v, doc_ids=docs)
    )
    torch.testing.assert_close(
        causal_attention(q, k, v), causal_attention_naive(q, k, v), rtol=1e-5, atol=1e-6
    )


def test_document_lengths():
    assert document_lengths(_docs(LAYOUTS["uneven"])) == LAYOUTS["uneven"]
    # equal ids in two rows are still two documents; a row start always starts one
    assert document_lengths(torch.tensor([[0, 0, 1], [1, 1, 1]])) == [[2, 1], [3]]


def _varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """flash varlen's contract on CPU: packed [total, H, D] tokens, documents at cu_seqlens,
    window (-1, 0) = causal."""
    assert window_size == (-1, 0) and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max_q == max_k == max(lengths)
    outs = [
        F.scaled_dot_product_attention(
            a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1), is_causal=True, scale=scale
        ).transpose(0, 1)
        for a, b, c in zip(q.split(lengths), k.split(lengths), v.split(lengths))
    ]
    return torch.cat(outs)


@pytest.mark.parametrize("seed", [0, 1])
def test_varlen_packing_with_a_cpu_stand_in(seed, monkeypatch):
    """What the CUDA path hands flash attention (packing, cu_seqlens, unpacking) is right;
    the kernel itself is torch's and has not run here (no GPU)."""
    monkeypatch.setattr(varlen_mod, "_varlen_attn", lambda: _varlen_stand_in)
    docs = _docs(LAYOUTS["uneven"])
    q, k, v, do = _inputs(seed, 3)
    check_against_reference(
        lambda q, k, v: causal_attention(q, k, v, doc_ids=docs, backend="varlen"),
        lambda q, k, v: causal_attention_naive(q, k, v, docs),
        (q, k, v), do, "qkv", TOL,
    )


def test_bad_arguments_are_named():
    q, k, v, _ = _inputs(0, 1)
    with pytest.raises(ValueError, match="backend"):
        causal_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="expected q, k"):
        causal_attention(q, k[:, :, :5], v)
