"""attention.lse: attention that also returns its log-sum-exp, and the merge of two key sets.

Everything is checked against the softmax written out in float64, on the fused CPU kernel
(``attention_lse_heads``) and on the plain-torch fallback (``attention_lse_math``).
"""
import logging
import math

import pytest
import torch

from IDFusion.attention import lse as lse_mod
from IDFusion.attention.lse import attention_lse, attention_lse_heads, attention_lse_math, merge_weight

# (batch, query tokens, key tokens, heads, head dim)
SHAPES = [(1, 5, 5, 1, 8), (2, 7, 3, 2, 4), (3, 1, 11, 4, 16), (2, 13, 29, 3, 5)]


def explicit(q, k, v, heads):
    """softmax(q·kᵀ/√d)·v and logsumexp(q·kᵀ/√d) on [B, L, H·D], head by head, in float64."""
    b, lq, c = q.shape
    d = c // heads
    out = torch.empty(b, lq, c, dtype=torch.float64)
    lse = torch.empty(b, heads, lq, dtype=torch.float64)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        scores = q[:, :, cols].double() @ k[:, :, cols].double().transpose(1, 2) / math.sqrt(d)
        lse[:, h] = torch.logsumexp(scores, dim=-1)
        out[:, :, cols] = torch.softmax(scores, dim=-1) @ v[:, :, cols].double()
    return out, lse


def split(t, heads):
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def qkv(b, lq, lk, heads, d, dtype=torch.float64, seed=0, kv_batch=None):
    g = torch.Generator().manual_seed(seed)
    kb = b if kv_batch is None else kv_batch
    q = torch.randn(b, lq, heads * d, generator=g, dtype=dtype)
    k = torch.randn(kb, lk, heads * d, generator=g, dtype=dtype)
    v = torch.randn(kb, lk, heads * d, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("shape", SHAPES)
def test_out_and_lse_equal_the_explicit_softmax(shape):
    b, lq, lk, heads, d = shape
    q, k, v = qkv(b, lq, lk, heads, d)
    out, lse = attention_lse(q, k, v, heads)
    want_out, want_lse = explicit(q, k, v, heads)
    assert out.shape == (b, lq, heads * d) and lse.shape == (b, heads, lq)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", [attention_lse_heads, attention_lse_math], ids=["kernel", "fallback"])
def test_each_path_equals_the_explicit_softmax(shape, path):
    b, lq, lk, heads, d = shape
    q, k, v = qkv(b, lq, lk, heads, d, seed=1)
    out, lse = path(split(q, heads), split(k, heads), split(v, heads))
    want_out, want_lse = explicit(q, k, v, heads)
    torch.testing.assert_close(out, split(want_out, heads), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_kernel_and_fallback_agree(dtype, tol):
    q, k, v = (split(t, 4) for t in qkv(2, 37, 19, 4, 8, dtype=dtype, seed=2))
    out_k, lse_k = attention_lse_heads(q, k, v)
    out_m, lse_m = attention_lse_math(q, k, v)
    assert out_k.dtype == out_m.dtype == dtype
    torch.testing.assert_close(out_k, out_m, rtol=tol, atol=tol)
    torch.testing.assert_close(lse_k, lse_m, rtol=tol, atol=tol)


def test_fallback_chunks_queries_without_seams(monkeypatch):
    """Chunks of 4 queries over 13 (the last one short) give the unchunked result."""
    q, k, v = (split(t, 2) for t in qkv(2, 13, 9, 2, 4, seed=3))
    whole = attention_lse_math(q, k, v)
    monkeypatch.setattr(lse_mod, "FALLBACK_QUERY_CHUNK", 4)
    chunked = attention_lse_math(q, k, v)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-12, atol=1e-12)


def test_refused_kernel_falls_back_and_warns_once(monkeypatch, caplog):
    def refuse(q, k, v):
        raise RuntimeError("no kernel for this input\nsecond line")

    monkeypatch.setattr(lse_mod, "_kernel_for", lambda device: refuse)
    monkeypatch.setattr(lse_mod, "_warned", set())
    q, k, v = (split(t, 2) for t in qkv(1, 6, 5, 2, 4, seed=4))
    with caplog.at_level(logging.WARNING, logger="IDFusion"):
        first = attention_lse_heads(q, k, v)
        second = attention_lse_heads(q, k, v)
    want = attention_lse_math(q, k, v)
    assert torch.equal(first[0], want[0]) and torch.equal(first[1], want[1])
    assert torch.equal(second[0], want[0])
    warnings = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1
    assert "no kernel for this input" in warnings[0].getMessage()
    assert "second line" not in warnings[0].getMessage()


def test_kernel_with_wrong_output_shapes_falls_back(monkeypatch):
    monkeypatch.setattr(lse_mod, "_kernel_for", lambda device: lambda q, k, v: (q[:, :, :1], q[:, :, :1, 0]))
    monkeypatch.setattr(lse_mod, "_warned", set())
    q, k, v = (split(t, 2) for t in qkv(1, 6, 5, 2, 4, seed=5))
    out, lse = attention_lse_heads(q, k, v)
    want = attention_lse_math(q, k, v)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


def test_batch_one_keys_broadcast_over_the_query_batch():
    q, k, v = qkv(3, 7, 5, 2, 4, seed=6, kv_batch=1)
    out, lse = attention_lse(q, k, v, 2)
    want_out, want_lse = explicit(q, k.expand(3, -1, -1), v.expand(3, -1, -1), 2)
    assert out.shape == (3, 7, 8) and lse.shape == (3, 2, 7)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("la,lb", [(5, 3), (1, 9), (16, 16)])
def test_merging_two_disjoint_key_sets_equals_attention_over_their_union(la, lb):
    heads = 3
    q, ka, va = qkv(2, 11, la, heads, 4, seed=7)
    _, kb, vb = qkv(2, 11, lb, heads, 4, seed=8)
    # Key set b on a different scale, so the two sets take clearly unequal shares.
    kb = 2.5 * kb
    out_a, lse_a = attention_lse(q, ka, va, heads)
    out_b, lse_b = attention_lse(q, kb, vb, heads)
    share_b = merge_weight(lse_a, lse_b).transpose(1, 2).unsqueeze(-1)          # [B, Lq, H, 1]
    share_a = merge_weight(lse_b, lse_a).transpose(1, 2).unsqueeze(-1)
    b, lq, c = out_a.shape
    merged = (share_a * out_a.view(b, lq, heads, -1) + share_b * out_b.view(b, lq, heads, -1)).reshape(b, lq, c)
    want_out, want_lse = explicit(q, torch.cat([ka, kb], 1), torch.cat([va, vb], 1), heads)
    torch.testing.assert_close(merged, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.logaddexp(lse_a, lse_b).double(), want_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(share_a + share_b, torch.ones_like(share_a), rtol=1e-12, atol=1e-12)


def test_merge_weight_is_the_other_sets_share_of_the_mass():
    lse_self = torch.tensor([0.0, math.log(3.0), 2.0])
    lse_other = torch.tensor([0.0, 0.0, float("-inf")])
    # mass e^L: shares 1/(1+1), 1/(3+1), and 0 for an empty other set
    torch.testing.assert_close(merge_weight(lse_self, lse_other), torch.tensor([0.5, 0.25, 0.0]))
