"""attention.groups: one softmax over key groups with per-query log-weights, computed group by
group; and the additive bias of attention.lse's plain-torch path. Checked against the softmax
written out in float64 with the bias ``log w`` on each group's keys."""
import math

import pytest
import torch

from IDFusion.attention.groups import Group, merge_groups
from IDFusion.attention.lse import attention_lse, attention_lse_heads, attention_lse_math


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def split(t, heads):
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def explicit(q, k, v, bias, heads):
    """softmax(q·kᵀ/√d + bias)·v and its logsumexp; q [B, Lq, C], k/v [B, Lk, C], bias [B, Lq, Lk]."""
    qh, kh, vh = (split(t, heads) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]) + bias.unsqueeze(1)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ vh
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d), lse


def grouped(q, k_base, v_base, parts, heads):
    """merge_groups of the base keys and each (k, v, rows, weight [B, n]) part."""
    out0, lse0 = attention_lse(q, k_base, v_base, heads)
    groups = []
    for k, v, rows, weight in parts:
        qr = q if rows is None else q[:, rows]
        o, lse = attention_lse(qr, k, v, heads)
        groups.append(Group(rows, o, lse, torch.log(weight)))
    return merge_groups(out0, lse0, groups, heads)


def test_unit_weights_on_all_rows_equal_attention_over_the_union():
    heads, b, lq = 3, 2, 9
    q, kb, vb = rand(b, lq, 12, seed=0), rand(b, 7, 12, seed=1), rand(b, 7, 12, seed=2)
    k1, v1 = 2 * rand(b, 4, 12, seed=3), rand(b, 4, 12, seed=4)
    k2, v2 = rand(b, 5, 12, seed=5), rand(b, 5, 12, seed=6)
    ones = torch.ones(b, lq, dtype=torch.float64)
    out, lse = grouped(q, kb, vb, [(k1, v1, None, ones), (k2, v2, None, ones)], heads)
    want, want_lse = explicit(q, torch.cat([kb, k1, k2], 1), torch.cat([vb, v1, v2], 1), torch.zeros(b, lq, 16), heads)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_weights_and_row_subsets_equal_a_log_bias_on_each_groups_keys():
    """Rows outside a group's subset, and weight 0, are −inf on its keys; other weights log w."""
    heads, b, lq = 2, 2, 10
    q, kb, vb = rand(b, lq, 8, seed=10), rand(b, 6, 8, seed=11), rand(b, 6, 8, seed=12)
    k1, v1 = 3 * rand(b, 4, 8, seed=13), rand(b, 4, 8, seed=14)
    k2, v2 = rand(b, 3, 8, seed=15), rand(b, 3, 8, seed=16)
    rows1 = torch.tensor([0, 2, 3, 7, 9])
    w1 = torch.tensor([[0.5, 0.0, 2.0, 1.0, 4.0], [1.0, 1.0, 0.0, 0.25, 3.0]], dtype=torch.float64)
    w2 = torch.rand(b, lq, generator=torch.Generator().manual_seed(17), dtype=torch.float64) * 3
    out, lse = grouped(q, kb, vb, [(k1, v1, rows1, w1), (k2, v2, None, w2)], heads)
    bias = torch.zeros(b, lq, 13, dtype=torch.float64)
    bias[:, :, 6:10] = float("-inf")
    bias[:, rows1, 6:10] = torch.log(w1).unsqueeze(-1)
    bias[:, :, 10:13] = torch.log(w2).unsqueeze(-1)
    want, want_lse = explicit(q, torch.cat([kb, k1, k2], 1), torch.cat([vb, v1, v2], 1), bias, heads)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_weight_zero_gives_exactly_no_attention_and_leaves_the_base_untouched():
    """A probe value of 1 on the group's keys reads its probability: exactly 0 where w = 0; rows
    that no group concerns come back bit for bit."""
    heads, b, lq = 2, 1, 6
    q, kb, vb = rand(b, lq, 8, seed=20), rand(b, 5, 8, seed=21), rand(b, 5, 8, seed=22)
    k1 = 5 * rand(b, 3, 8, seed=23)
    probe = torch.ones(b, 3, 8, dtype=torch.float64)
    rows = torch.tensor([1, 4])
    weight = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    zero_v = torch.zeros_like(vb)
    out, _ = grouped(q, kb, zero_v, [(k1, probe, rows, weight)], heads)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert bool((out[:, 4] > 0).all())
    base, _ = attention_lse(q, kb, vb, heads)
    merged, _ = grouped(q, kb, vb, [(k1, rand(b, 3, 8, seed=24), rows, weight)], heads)
    keep = [0, 1, 2, 3, 5]
    assert torch.equal(merged[:, keep], base[:, keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_the_input_dtype(dtype):
    q, kb, vb = (rand(1, 4, 8, seed=s).to(dtype) for s in (30, 31, 32))
    out, lse = grouped(q, kb, vb, [(kb, vb, None, torch.ones(1, 4, dtype=dtype))], 2)
    assert out.dtype == dtype and lse.dtype == dtype


def test_lse_math_applies_an_additive_bias_and_a_boolean_mask():
    heads = 2
    q, k, v = rand(2, 5, 8, seed=40), rand(2, 7, 8, seed=41), rand(2, 7, 8, seed=42)
    bias = rand(2, 1, 7, seed=43)
    want, want_lse = explicit(q, k, v, bias.expand(-1, 5, -1), heads)
    out, lse = attention_lse_heads(*(split(t, heads) for t in (q, k, v)), bias=bias.unsqueeze(1))
    torch.testing.assert_close(out.transpose(1, 2).reshape(2, 5, 8), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    allowed = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    allowed[..., 5:] = False
    masked, _ = attention_lse_math(*(split(t, heads) for t in (q, k, v)), bias=allowed)
    cut, _ = attention_lse_math(*(split(t, heads) for t in (q, k[:, :5], v[:, :5])))
    torch.testing.assert_close(masked, cut, rtol=1e-12, atol=1e-12)


def test_lse_math_bias_rows_follow_the_query_chunks(monkeypatch):
    from IDFusion.attention import lse as lse_mod
    heads = 1
    q, k, v = (split(rand(1, 9, 4, seed=s), heads) for s in (50, 51, 52))
    bias = rand(1, 1, 9, 9, seed=53)
    whole = attention_lse_math(q, k, v, bias)
    monkeypatch.setattr(lse_mod, "FALLBACK_QUERY_CHUNK", 4)
    chunked = attention_lse_math(q, k, v, bias)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-12)
