"""Reference attention with λ blending, identity mixing and per-query routing.

FlashFace (eq. 2 and supplement eq. 1) blends, for generated tokens y and the reference
tokens r_i of identity i,

    (1 − λ)·Attn(y, y) + λ·Σ_i α_i·Attn(y, cat[y, r_i])        (Σ_i α_i = 1)

With ``Attn(y, cat[y, r]) = O_s + σ(L_r − L_s)·(O_r − O_s)`` (see ``attention.lse``) the whole
expression is

    O_s + Σ_i (λ·α_i)·σ(L_i − L_s)·(O_i − O_s)

so one self-attention with its log-sum-exp plus one attention per identity over its own
reference keys gives every blend, mixing weight and route: the cost of a single attention
over the concatenated keys. ``weights[b, q, i] = λ_b·α_i(b, q)`` carries everything: λ per
batch row (three-way guidance gives the reference to one branch only), mixing weights per
identity, and routing masks per query (0 = the query never sees identity i, exactly).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .lse import accumulation_dtype, attention_lse

#: ``fn(q, k, v, heads) -> out`` on ``[B, L, H·D]`` tensors: the host's attention.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def blend(o_self: torch.Tensor, lse_self: torch.Tensor,
          parts: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
          weights: torch.Tensor, heads: int) -> torch.Tensor:
    """``O_s + Σ_i weights_i·σ(L_i − L_s)·(O_i − O_s)``.

    o_self: [B, Lq, H·D]; lse_self: [B, H, Lq]; parts[i]: (o_i [B, Lq, H·D], lse_i [B, H, Lq])
    or None for an identity no row uses; weights: [B, Lq or 1, M].
    """
    b, lq, c = o_self.shape
    acc = accumulation_dtype(o_self.dtype)
    base = o_self.view(b, lq, heads, c // heads).to(acc)
    out = base
    for i, part in enumerate(parts):
        if part is None:
            continue
        o_i, lse_i = part
        share = torch.sigmoid(lse_i - lse_self).transpose(1, 2)          # [B, Lq, H]
        w = (share * weights[:, :, i:i + 1].to(acc)).unsqueeze(-1)       # [B, Lq, H, 1]
        out = out + w * (o_i.view(b, lq, heads, c // heads).to(acc) - base)
    return out.to(o_self.dtype).view(b, lq, c)


def _rows(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Rows ``index`` of t, where t may be shared (batch 1) across rows."""
    if index is None or t.shape[0] == 1:
        return t
    return t[index]


def _identity_part(q, k_i, v_i, w_i, o_self, heads):
    """(O_i, L_i) for the rows that use identity i; other rows get (O_s, −inf): no share."""
    used = w_i.abs().flatten(1).amax(dim=1) > 0                              # [B]
    if not bool(used.any()):
        return None
    if bool(used.all()):
        return attention_lse(q, k_i, v_i, heads)
    rows = used.nonzero().squeeze(1)
    o_u, lse_u = attention_lse(q[rows], _rows(k_i, rows), _rows(v_i, rows), heads)
    o_i = o_self.clone()
    o_i[rows] = o_u
    lse_i = torch.full((q.shape[0],) + lse_u.shape[1:], float("-inf"), device=lse_u.device, dtype=lse_u.dtype)
    lse_i[rows] = lse_u
    return o_i, lse_i


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        refs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        weights: torch.Tensor, heads: int, attention: AttentionFn) -> torch.Tensor:
    """Self-attention of q over (k, v) blended with attention over each identity's references.

    q, k, v: [B, L, H·D] (already projected); refs[i] = (k_i, v_i), each [B or 1, R_i, H·D];
    weights: [B, Lq or 1, M] = λ·α (see module docstring). Rows whose weights are all zero
    are computed by ``attention`` (the host's own kernel) on those rows; when no row has a
    reference the call is exactly the host's (what the unpatched block computes); the other
    rows use the log-sum-exp merge.
    """
    if len(refs) != weights.shape[-1]:
        raise ValueError(f"{len(refs)} identities' references but weights for {weights.shape[-1]}")
    active = weights.abs().flatten(1).amax(dim=1) > 0                     # [B]
    if not bool(active.any()):
        return attention(q, k, v, heads)
    all_active = bool(active.all())
    index = None if all_active else active.nonzero().squeeze(1)
    qa, ka, va = _rows(q, index), _rows(k, index), _rows(v, index)
    wa = _rows(weights, index)
    o_self, lse_self = attention_lse(qa, ka, va, heads)
    parts = [_identity_part(qa, _rows(k_i, index), _rows(v_i, index), wa[:, :, i], o_self, heads)
             for i, (k_i, v_i) in enumerate(refs)]
    out_active = blend(o_self, lse_self, parts, wa, heads)
    if all_active:
        return out_active
    out = torch.empty_like(q)
    rest = (~active).nonzero().squeeze(1)
    out[index] = out_active
    out[rest] = attention(q[rest], k[rest], v[rest], heads)
    return out
