"""attention.reference: λ-blended reference attention, identity mixing and per-query routing.

Each property is checked against the formula written with full attentions of a plain-torch
host attention (FlashFace eq. 2 and supplement eq. 1), in float64:

    (1 − λ)·Attn(y, y) + λ·Σ_i w_i·Attn(y, cat[y, r_i])
"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from IDFusion.attention.lse import attention_lse
from IDFusion.attention.reference import blend, reference_attention

HEADS = 2
DIM = 8                      # H·D
TOL = dict(rtol=1e-12, atol=1e-12)


def host_attention(q, k, v, heads, mask=None, backend=SDPBackend.MATH):
    """The host's attention as ComfyUI calls it: [B, L, H·D] in and out, additive mask [B|1, Lq, Lk].

    torch's math backend: its bits differ from the fused kernel behind ``attention_lse``, so
    an output equal to it bit for bit really came from the host's own attention. Its bits
    may also depend on the batch size (here a batch of one row takes another matmul path).
    """
    b, lq, c = q.shape

    def heads_first(t):
        return t.reshape(t.shape[0], t.shape[1], heads, c // heads).transpose(1, 2)

    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, c)


#: A host whose rows do not depend on the batch they come in: torch's fused CPU kernel.
batch_invariant_host = functools.partial(host_attention, backend=SDPBackend.FLASH_ATTENTION)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tokens(b=3, lq=10, seed=0):
    """Projected q, k, v of the generated tokens y."""
    return randn(b, lq, DIM, seed=seed), randn(b, lq, DIM, seed=seed + 1), randn(b, lq, DIM, seed=seed + 2)


def ref(b, length, seed):
    """Projected keys and values of one identity's reference tokens r_i (scaled: a clear share)."""
    return 1.5 * randn(b, length, DIM, seed=seed), randn(b, length, DIM, seed=seed + 1)


def attn_with(q, k, v, r):
    """Attn(y, cat[y, r]): one full attention over the concatenated keys (a batch-1 r broadcast)."""
    k_r, v_r = (t.expand(q.shape[0], -1, -1) for t in r)
    return host_attention(q, torch.cat([k, k_r], 1), torch.cat([v, v_r], 1), HEADS)


def same_weights(b, *per_identity):
    """weights [B, 1, M]: the same λ·α_i for every row and query."""
    return torch.tensor(per_identity, dtype=torch.float64).view(1, 1, -1).expand(b, 1, -1)


def formula(q, k, v, refs, weights):
    """(1 − Σ_i w_i)·Attn(y, y) + Σ_i w_i·Attn(y, cat[y, r_i]) with weights [B, Lq|1, M] = λ·α."""
    out = (1 - weights.sum(-1, keepdim=True)) * host_attention(q, k, v, HEADS)
    for i, r in enumerate(refs):
        out = out + weights[:, :, i:i + 1] * attn_with(q, k, v, r)
    return out


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.85, 1.0, 1.7])
def test_one_identity_equals_the_lambda_blend_of_two_full_attentions(lam):
    q, k, v = tokens()
    r = ref(3, 6, seed=10)
    out = reference_attention(q, k, v, [r], same_weights(3, lam), HEADS, host_attention)
    want = (1 - lam) * host_attention(q, k, v, HEADS) + lam * attn_with(q, k, v, r)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, want, **TOL)


@pytest.mark.parametrize("lam", [0.5, 0.85, 1.3])
@pytest.mark.parametrize("mix", [(0.5, 0.5), (0.2, 0.8), (0.9, 0.1)])
def test_two_identities_mix_as_in_flashface_supplement_eq_1(lam, mix):
    q, k, v = tokens()
    refs = [ref(3, 4, seed=20), ref(1, 7, seed=30)]          # different lengths; the second shared by all rows
    w1, w2 = mix
    weights = same_weights(3, lam * w1, lam * w2)
    out = reference_attention(q, k, v, refs, weights, HEADS, host_attention)
    want = lam * (w1 * attn_with(q, k, v, refs[0]) + w2 * attn_with(q, k, v, refs[1])) \
        + (1 - lam) * host_attention(q, k, v, HEADS)
    torch.testing.assert_close(out, want, **TOL)


@pytest.mark.parametrize("lam", [0.85, 1.0])
def test_mixing_weights_one_and_zero_give_exactly_the_single_identity(lam):
    q, k, v = tokens()
    r1, r2 = ref(3, 5, seed=40), ref(3, 3, seed=50)
    single_1 = reference_attention(q, k, v, [r1], same_weights(3, lam), HEADS, host_attention)
    single_2 = reference_attention(q, k, v, [r2], same_weights(3, lam), HEADS, host_attention)
    first = reference_attention(q, k, v, [r1, r2], same_weights(3, lam, 0.0), HEADS, host_attention)
    second = reference_attention(q, k, v, [r1, r2], same_weights(3, 0.0, lam), HEADS, host_attention)
    assert torch.equal(first, single_1)
    assert torch.equal(second, single_2)
    assert not torch.equal(single_1, single_2)


def test_the_host_attention_is_not_bitwise_the_lse_kernel():
    """Makes the bit-for-bit comparisons with the host below mean something."""
    q, k, v = tokens(b=4)
    host = host_attention(q, k, v, HEADS)
    kernel = attention_lse(q, k, v, HEADS)[0]
    torch.testing.assert_close(kernel, host, **TOL)
    assert all(not torch.equal(kernel[row], host[row]) for row in range(4))


def test_all_zero_weights_are_exactly_the_host_attention():
    q, k, v = tokens()
    out = reference_attention(q, k, v, [ref(3, 5, seed=60)], torch.zeros(3, 1, 1, dtype=torch.float64),
                              HEADS, host_attention)
    assert torch.equal(out, host_attention(q, k, v, HEADS))


MIXED = torch.tensor([[[0.6, 0.25]], [[0.85, 0.0]], [[0.0, 1.2]], [[0.4, 0.4]]], dtype=torch.float64)


@pytest.mark.parametrize("off", [[1], [0, 2], [0, 1, 3]])
def test_rows_with_zero_weights_are_computed_by_the_host_attention_in_a_mixed_batch(off):
    q, k, v = tokens(b=4)
    refs = [ref(4, 5, seed=70), ref(1, 3, seed=80)]
    weights = MIXED.clone()
    weights[off] = 0.0
    on = [r for r in range(4) if r not in off]
    out = reference_attention(q, k, v, refs, weights, HEADS, host_attention)
    assert torch.equal(out[off], host_attention(q[off], k[off], v[off], HEADS))
    torch.testing.assert_close(out[on], formula(q, k, v, refs, weights)[on], **TOL)
    assert not torch.allclose(out[on], host_attention(q, k, v, HEADS)[on])


@pytest.mark.parametrize("off", [[1], [0, 2], [0, 1, 3]])
def test_rows_with_zero_weights_equal_the_unpatched_batch_under_a_batch_invariant_host(off):
    """Bit for bit what the unpatched model gives those rows, when the host's rows do not
    depend on their batch (the off rows are computed as a batch of their own)."""
    q, k, v = tokens(b=4)
    refs = [ref(4, 5, seed=70), ref(1, 3, seed=80)]
    weights = MIXED.clone()
    weights[off] = 0.0
    out = reference_attention(q, k, v, refs, weights, HEADS, batch_invariant_host)
    assert torch.equal(out[off], batch_invariant_host(q, k, v, HEADS)[off])


def test_per_query_weights_follow_the_formula_query_by_query():
    q, k, v = tokens(b=2, lq=12)
    refs = [ref(2, 5, seed=90), ref(2, 4, seed=100)]
    g = torch.Generator().manual_seed(110)
    weights = torch.rand(2, 12, 2, generator=g, dtype=torch.float64) * 0.9
    weights[:, :3] = 0.0                              # queries outside every region
    weights[:, 3:6, 1] = 0.0                          # queries routed to identity 0 only
    out = reference_attention(q, k, v, refs, weights, HEADS, host_attention)
    torch.testing.assert_close(out, formula(q, k, v, refs, weights), **TOL)


def test_a_query_with_zero_weight_on_an_identity_is_exactly_unaffected_by_its_keys():
    """Face-fusion eq. 7 as a route: perturbing identity 0's references moves only its queries."""
    b, lq = 2, 12
    q, k, v = tokens(b=b, lq=lq)
    refs = [ref(b, 5, seed=120), ref(1, 4, seed=130)]
    weights = torch.zeros(b, lq, 2, dtype=torch.float64)
    weights[:, 0:4, 0] = 0.85                         # routed to identity 0
    weights[:, 4:8, 1] = 0.85                         # routed to identity 1
    weights[1, 8:10] = torch.tensor([0.5, 0.35], dtype=torch.float64)   # both, in row 1 only
    before = reference_attention(q, k, v, refs, weights, HEADS, host_attention)
    perturbed = [(refs[0][0] + randn(b, 5, DIM, seed=140), refs[0][1] - 3.0), refs[1]]
    after = reference_attention(q, k, v, perturbed, weights, HEADS, host_attention)
    blind = weights[..., 0] == 0                                         # [B, Lq]
    assert torch.equal(after[blind], before[blind])
    assert not torch.isclose(after[~blind], before[~blind]).all(dim=-1).any()


def test_an_identity_used_by_some_rows_equals_computing_it_on_all_rows():
    """The row-subset path (only rows that use identity i attend to its keys) changes no value."""
    q, k, v = tokens(b=4)
    refs = [ref(4, 5, seed=150), ref(1, 6, seed=160)]
    weights = torch.tensor([[[0.85, 0.0]], [[0.5, 0.5]], [[0.0, 1.1]], [[0.85, 0.0]]], dtype=torch.float64)
    out = reference_attention(q, k, v, refs, weights, HEADS, host_attention)
    o_self, lse_self = attention_lse(q, k, v, HEADS)
    every_row = [attention_lse(q, k_i, v_i, HEADS) for k_i, v_i in refs]
    torch.testing.assert_close(out, blend(o_self, lse_self, every_row, weights, HEADS), **TOL)
    torch.testing.assert_close(out, formula(q, k, v, refs, weights), **TOL)


def test_active_rows_and_partly_used_identity_together():
    """Row 0 off (host path), identity 1 used by row 2 only (row-subset path inside the active rows)."""
    q, k, v = tokens(b=3)
    refs = [ref(3, 5, seed=170), ref(3, 2, seed=180)]
    weights = torch.tensor([[[0.0, 0.0]], [[0.85, 0.0]], [[0.3, 0.6]]], dtype=torch.float64)
    out = reference_attention(q, k, v, refs, weights, HEADS, host_attention)
    assert torch.equal(out[:1], host_attention(q[:1], k[:1], v[:1], HEADS))
    torch.testing.assert_close(out[1:], formula(q, k, v, refs, weights)[1:], **TOL)


def test_shared_references_equal_references_repeated_per_row():
    q, k, v = tokens()
    k_r, v_r = ref(1, 5, seed=190)
    weights = torch.tensor([[[0.85]], [[0.5]], [[1.0]]], dtype=torch.float64)
    shared = reference_attention(q, k, v, [(k_r, v_r)], weights, HEADS, host_attention)
    repeated = reference_attention(q, k, v, [(k_r.expand(3, -1, -1), v_r.expand(3, -1, -1))], weights,
                                   HEADS, host_attention)
    torch.testing.assert_close(shared, repeated, **TOL)


def test_float32_and_half_inputs_keep_their_dtype_and_the_formula():
    q, k, v = tokens()
    refs = [ref(3, 5, seed=200)]
    weights = torch.full((3, 1, 1), 0.85, dtype=torch.float64)
    want = formula(q, k, v, refs, weights)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        cast = [t.to(dtype) for t in (q, k, v)]
        out = reference_attention(*cast, [tuple(t.to(dtype) for t in refs[0])], weights.to(dtype), HEADS,
                                  host_attention)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_a_count_mismatch_between_references_and_weights_raises():
    q, k, v = tokens()
    with pytest.raises(ValueError, match="2 identities' references but weights for 1"):
        reference_attention(q, k, v, [ref(3, 5, seed=210), ref(3, 5, seed=220)],
                            torch.ones(3, 1, 1, dtype=torch.float64), HEADS, host_attention)


# --- references that count several times (FlashFace pads to four by repetition) -----------------

REF_TOKENS = 3                # tokens per reference


def cyclic(n: int, total: int = 4) -> list[int]:
    """The official padding, made deterministic: references repeated in turn up to ``total``."""
    return [i % n for i in range(max(n, total))]


def counted(n: int, total: int = 4) -> list[tuple[int, float]]:
    """Runs ``(keys, log m)`` of n references of REF_TOKENS keys padded cyclically to ``total``."""
    runs = []
    for i in range(n):
        m = cyclic(n, total).count(i)
        if runs and runs[-1][1] == math.log(m):
            runs[-1] = (runs[-1][0] + REF_TOKENS, runs[-1][1])
        else:
            runs.append((REF_TOKENS, math.log(m)))
    return runs


def padded(r: tuple[torch.Tensor, torch.Tensor], n: int, total: int = 4):
    """The explicitly padded key sequence: reference j's tokens placed once per repetition."""
    pieces = [slice(j * REF_TOKENS, (j + 1) * REF_TOKENS) for j in cyclic(n, total)]
    return tuple(torch.cat([t[:, p] for p in pieces], dim=1) for t in r)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.85, 1.2])
def test_counted_references_equal_attention_over_the_explicitly_padded_keys(n, lam):
    """[y; r1, r1, r1, r1], [y; r1, r2, r1, r2], [y; r1, r2, r3, r1]: the official four-reference
    attention, from the distinct references' keys and log m on their log-sum-exp."""
    q, k, v = tokens()
    r = ref(3, n * REF_TOKENS, seed=300 + n)
    weights = same_weights(3, lam)
    out = reference_attention(q, k, v, [r], weights, HEADS, host_attention, counts=[counted(n)])
    torch.testing.assert_close(out, formula(q, k, v, [padded(r, n)], weights), **TOL)
    if n < 4:
        assert not torch.allclose(out, formula(q, k, v, [r], weights))      # padding really weighs in


def test_counted_references_with_mixing_routing_and_partly_used_rows():
    """Counts combine with everything else: two identities (1 and 3 references padded to 4), one
    row off, identity 1 only on some queries of some rows."""
    q, k, v = tokens(b=4, lq=12)
    refs = [ref(4, REF_TOKENS, seed=310), ref(1, 3 * REF_TOKENS, seed=320)]
    weights = torch.zeros(4, 12, 2, dtype=torch.float64)
    weights[0, :, 0] = 0.85
    weights[2] = torch.tensor([0.5, 0.4], dtype=torch.float64)
    weights[3, 6:, 1] = 1.1
    out = reference_attention(q, k, v, refs, weights, HEADS, host_attention, counts=[counted(1), counted(3)])
    want = formula(q, k, v, [padded(refs[0], 1), padded(refs[1], 3)], weights)
    torch.testing.assert_close(out, want, **TOL)
    assert torch.equal(out[1:2], host_attention(q[1:2], k[1:2], v[1:2], HEADS))


def test_used_rows_given_on_the_host_are_what_the_weights_say():
    """The patches pass which rows use which identity from host data; the result is the same."""
    from IDFusion.attention.reference import rows_used
    q, k, v = tokens(b=4)
    refs = [ref(4, 5, seed=330), ref(1, 3, seed=340)]
    used = rows_used(MIXED)
    assert used.tolist() == [[True, True], [True, False], [False, True], [True, True]]
    given = reference_attention(q, k, v, refs, MIXED, HEADS, host_attention, used=used)
    assert torch.equal(given, reference_attention(q, k, v, refs, MIXED, HEADS, host_attention))
    with pytest.raises(ValueError, match=r"used must be \[4, 2\]"):
        reference_attention(q, k, v, refs, MIXED, HEADS, host_attention, used=used[:2])


def test_merge_of_disjoint_key_sets_is_the_attention_over_their_union():
    from IDFusion.attention.lse import merge_lse
    q = randn(2, 6, DIM, seed=350)
    k, v = randn(2, 9, DIM, seed=351), randn(2, 9, DIM, seed=352)
    parts = [attention_lse(q, k[:, a:b], v[:, a:b], HEADS) for a, b in ((0, 2), (2, 7), (7, 9))]
    out, lse = merge_lse(parts, HEADS)
    whole, whole_lse = attention_lse(q, k, v, HEADS)
    torch.testing.assert_close(out, whole, **TOL)
    torch.testing.assert_close(lse, whole_lse, **TOL)


def test_counts_must_cover_the_keys():
    from IDFusion.attention.lse import attention_lse_counted
    q, k, v = tokens()
    with pytest.raises(ValueError, match="counts cover 4 keys but there are 5"):
        attention_lse_counted(q, k[:, :5], v[:, :5], HEADS, [(4, 0.0)])


@pytest.mark.parametrize("flags", [[True, False, True, True, False], [False, False, True], [True], [False, True]])
def test_rows_picked_by_runs_and_put_back_in_order(flags):
    from IDFusion.attention.reference import interleave, row_runs, take_rows
    t = torch.arange(len(flags) * 2.0).view(len(flags), 2)
    chosen = take_rows(t, row_runs(flags))
    others = take_rows(t, row_runs([not f for f in flags])) if not all(flags) else t[:0]
    assert chosen.tolist() == [row.tolist() for row, f in zip(t, flags) if f]
    assert torch.equal(interleave(flags, chosen, others), t)
