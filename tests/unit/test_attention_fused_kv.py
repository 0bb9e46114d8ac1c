"""attention.fused_kv: text and face keys under one softmax (face-fusion eqs. 3–7).

The reference is the softmax written out in float64: S = softmax(bias + q·Kᵀ/√d), h = S·V
with K = [K_text; K_f1; …], V = [V_text; V_f1; …].
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from IDFusion.attention.fused_kv import fused_kv_attention, identity_bias

HEADS = 2
DIM = 8                      # H·D
TEXT = 5                     # text tokens
REF_LENS = (3, 4)            # tokens of face 0 and face 1
TOL = dict(rtol=1e-12, atol=1e-12)


def host_attention(q, k, v, heads, mask=None):
    """The host's attention as ComfyUI calls it: [B, L, H·D] in and out, additive mask [B|1, Lq, Lk].

    torch's math backend: masked keys get exp(−inf) = 0 in a plain softmax.
    """
    b, lq, c = q.shape

    def heads_first(t):
        return t.reshape(t.shape[0], t.shape[1], heads, c // heads).transpose(1, 2)

    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, c)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def inputs(b=2, lq=6, face_batch=None):
    fb = b if face_batch is None else face_batch
    q = randn(b, lq, DIM, seed=0)
    k_text, v_text = randn(b, TEXT, DIM, seed=1), randn(b, TEXT, DIM, seed=2)
    faces = [(randn(fb, n, DIM, seed=10 + i), randn(fb, n, DIM, seed=20 + i)) for i, n in enumerate(REF_LENS)]
    return q, k_text, v_text, faces


def probabilities(q, k, bias):
    """S = softmax(bias + q·Kᵀ/√d) per head: [B, H, Lq, Lk]."""
    b, lq, c = q.shape
    d = c // HEADS
    qh = q.view(b, lq, HEADS, d).transpose(1, 2)
    kh = k.view(k.shape[0], k.shape[1], HEADS, d).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias.unsqueeze(1)
    return torch.softmax(scores, dim=-1)


def explicit(q, k_text, v_text, faces, bias):
    b = q.shape[0]
    k = torch.cat([k_text] + [f[0].expand(b, -1, -1) for f in faces], 1)
    v = torch.cat([v_text] + [f[1].expand(b, -1, -1) for f in faces], 1)
    vh = v.view(b, v.shape[1], HEADS, -1).transpose(1, 2)
    return (probabilities(q, k, bias) @ vh).transpose(1, 2).reshape(q.shape)


def routed_alpha(b=2, lq=6):
    """Queries 0–1 → face 0, 2–3 → face 1, 4–5 → both (mixing 0.7 / 0.3)."""
    alpha = torch.zeros(b, lq, 2)
    alpha[:, 0:2, 0] = 1
    alpha[:, 2:4, 1] = 1
    alpha[:, 4:6] = torch.tensor([0.7, 0.3])
    return alpha


@pytest.mark.parametrize("alpha,weight", [(torch.ones(1, 1, 2), 1.0), (torch.ones(2, 6, 2), 1.0),
                                          (torch.full((1, 1, 3), 0.5), 2.0)])
def test_identity_bias_is_zero_when_every_scaled_weight_is_one(alpha, weight):
    """All zeros: a caller that knows it on the host (the patch) skips the bias altogether."""
    bias = identity_bias(alpha, TEXT, [3] * alpha.shape[-1], weight, torch.float32)
    assert torch.equal(bias, torch.zeros(*alpha.shape[:2], TEXT + 3 * alpha.shape[-1]))


@pytest.mark.parametrize("weight", [1.0, 0.6, 2.5])
def test_identity_bias_is_log_weight_on_faces_minus_inf_where_zero_and_zero_on_text(weight):
    alpha = routed_alpha()
    bias = identity_bias(alpha, TEXT, REF_LENS, weight, torch.float64)
    assert bias.shape == (2, 6, TEXT + sum(REF_LENS)) and bias.dtype == torch.float64
    assert torch.equal(bias[..., :TEXT], torch.zeros(2, 6, TEXT, dtype=torch.float64))
    start = TEXT
    for i, n in enumerate(REF_LENS):
        cols = bias[..., start:start + n]
        scaled = (alpha[..., i] * weight).double()
        off = scaled == 0
        assert torch.isneginf(cols[off]).all() and torch.isfinite(cols[~off]).all()
        # computed in float32 whatever the output dtype: float32 accuracy
        torch.testing.assert_close(cols[~off], torch.log(scaled[~off]).unsqueeze(-1).expand(-1, n),
                                   rtol=1e-6, atol=1e-6)
        start += n


def test_identity_bias_with_weight_zero_closes_every_face_key_but_no_text_key():
    bias = identity_bias(torch.ones(1, 1, 2), TEXT, REF_LENS, 0.0, torch.float16)
    assert bias.shape == (1, 1, TEXT + sum(REF_LENS)) and bias.dtype == torch.float16
    assert (bias[..., :TEXT] == 0).all() and torch.isneginf(bias[..., TEXT:]).all()


@pytest.mark.parametrize("weight", [1.0, 0.6, 2.5])
def test_fused_kv_attention_is_one_softmax_over_text_and_face_keys(weight):
    q, k_text, v_text, faces = inputs()
    bias = identity_bias(routed_alpha(), TEXT, REF_LENS, weight, torch.float64)
    out = fused_kv_attention(q, k_text, v_text, faces, bias, HEADS, host_attention)
    torch.testing.assert_close(out, explicit(q, k_text, v_text, faces, bias), **TOL)


def test_without_bias_every_query_sees_every_face():
    q, k_text, v_text, faces = inputs()
    out = fused_kv_attention(q, k_text, v_text, faces, None, HEADS, host_attention)
    torch.testing.assert_close(out, explicit(q, k_text, v_text, faces, None), **TOL)
    no_faces = fused_kv_attention(q, k_text, v_text, [], None, HEADS, host_attention)
    assert torch.equal(no_faces, host_attention(q, k_text, v_text, HEADS))


def test_a_query_routed_to_one_identity_puts_exactly_zero_probability_on_the_others():
    q, k_text, v_text, faces = inputs()
    alpha = routed_alpha()
    bias = identity_bias(alpha, TEXT, REF_LENS, 1.0, torch.float64)
    k = torch.cat([k_text] + [f[0] for f in faces], 1)
    probs = probabilities(q, k, bias)                                   # [B, H, Lq, Lk]
    face0 = slice(TEXT, TEXT + REF_LENS[0])
    face1 = slice(TEXT + REF_LENS[0], None)
    assert (probs[:, :, 0:2, face1] == 0).all() and (probs[:, :, 0:2, face0] > 0).all()
    assert (probs[:, :, 2:4, face0] == 0).all() and (probs[:, :, 2:4, face1] > 0).all()
    assert (probs[:, :, 4:6, TEXT:] > 0).all()
    assert (probs[..., :TEXT] > 0).all()


def test_a_routed_query_is_exactly_unaffected_by_the_other_identitys_keys():
    q, k_text, v_text, faces = inputs()
    bias = identity_bias(routed_alpha(), TEXT, REF_LENS, 1.0, torch.float64)
    before = fused_kv_attention(q, k_text, v_text, faces, bias, HEADS, host_attention)
    moved = [faces[0], (faces[1][0] + randn(2, REF_LENS[1], DIM, seed=30), faces[1][1] - 3.0)]
    after = fused_kv_attention(q, k_text, v_text, moved, bias, HEADS, host_attention)
    assert torch.equal(after[:, 0:2], before[:, 0:2])                  # routed to face 0
    assert not torch.isclose(after[:, 2:6], before[:, 2:6]).all(dim=-1).any()


def test_batch_one_faces_and_bias_broadcast_over_the_batch():
    q, k_text, v_text, faces = inputs(b=3, face_batch=1)
    alpha = torch.tensor([[[0.8, 0.0]]])                                 # [1, 1, M]: shared by rows and queries
    bias = identity_bias(alpha, TEXT, REF_LENS, 1.0, torch.float64)
    assert bias.shape == (1, 1, TEXT + sum(REF_LENS))
    out = fused_kv_attention(q, k_text, v_text, faces, bias, HEADS, host_attention)
    repeated = [(k.expand(3, -1, -1), v.expand(3, -1, -1)) for k, v in faces]
    full_bias = bias.expand(3, q.shape[1], -1)
    torch.testing.assert_close(out, fused_kv_attention(q, k_text, v_text, repeated, full_bias, HEADS, host_attention),
                               **TOL)
    torch.testing.assert_close(out, explicit(q, k_text, v_text, faces, full_bias), **TOL)


def test_a_reference_counted_m_times_equals_its_keys_placed_m_times():
    """counts add log m to a reference's keys: the softmax over text + padded face keys."""
    q, k_text, v_text, faces = inputs()
    (k0, v0), (k1, v1) = faces                                           # 3 and 4 keys
    counts = [[(3, math.log(4))], [(2, math.log(2)), (2, 0.0)]]           # face 1: its first 2 keys twice
    bias = identity_bias(torch.ones(1, 1, 2), TEXT, REF_LENS, 1.0, torch.float64, counts)
    out = fused_kv_attention(q, k_text, v_text, faces, bias, HEADS, host_attention)
    padded = [(torch.cat([k0] * 4, 1), torch.cat([v0] * 4, 1)),
              (torch.cat([k1[:, :2], k1[:, :2], k1[:, 2:]], 1), torch.cat([v1[:, :2], v1[:, :2], v1[:, 2:]], 1))]
    torch.testing.assert_close(out, explicit(q, k_text, v_text, padded, None), **TOL)
