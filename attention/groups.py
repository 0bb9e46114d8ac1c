"""One softmax over several key groups, each weighted per query, computed group by group.

A DiT's joint attention sees the text, the image and, with native references, every
reference image's tokens. Routing people apart and setting how strongly each person's
references act is an additive bias ``log w_p(q)`` on the logits of person p's keys (the
log-bias of ``attention.fused_kv``; ``w = 0`` is −inf: exactly no attention). Written per
group, with ``(O_g, L_g)`` the attention over group g alone and its log-sum-exp,

    Attn_w(q) = (e^{L_0}·O_0 + Σ_p w_p·e^{L_p}·O_p) / (e^{L_0} + Σ_p w_p·e^{L_p})

where group 0 (the base keys: text and image) has weight 1 everywhere. Computing it this way
never builds the ``[Lq, Lk]`` bias: each person's keys are attended only by the query rows
that may see them, and with every weight 1 it is the attention over the union of the keys.
The union's log-sum-exp ``L = log(e^{L_0} + Σ_p w_p·e^{L_p})`` comes back too, so a later
λ-blend (``attention.reference.blend``) can treat the result as its self-attention.

Layout as in ``attention.lse``: outputs ``[B, L, H·D]``, log-sum-exps ``[B, H, L]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .lse import accumulation_dtype


@dataclass
class Group:
    """One key group's attention for some query rows.

    rows: LongTensor [n] of the query rows it concerns (distinct), or None for all rows;
    out: [B, n, H·D]; lse: [B, H, n]; log_weight: [B, n] (−inf: the row does not see the group).
    """

    rows: torch.Tensor | None
    out: torch.Tensor
    lse: torch.Tensor
    log_weight: torch.Tensor


def _at(t: torch.Tensor, rows: torch.Tensor | None, dim: int) -> torch.Tensor:
    return t if rows is None else t.index_select(dim, rows)


def merge_groups(out_base: torch.Tensor, lse_base: torch.Tensor, groups: list[Group],
                 heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted union of the base attention ``(out_base [B, Lq, H·D], lse_base [B, H, Lq])``
    and ``groups``: ``(out [B, Lq, H·D] in out_base's dtype, lse [B, H, Lq])``."""
    b, lq, c = out_base.shape
    acc = accumulation_dtype(out_base.dtype)
    scores = [(g, g.lse.to(acc) + g.log_weight.to(acc).unsqueeze(1)) for g in groups]       # [B, H, n]
    top = lse_base.to(acc).clone()
    for g, s in scores:
        if g.rows is None:
            top = torch.maximum(top, s)
        else:
            top[:, :, g.rows] = torch.maximum(top[:, :, g.rows], s)
    base_w = torch.exp(lse_base.to(acc) - top)                                              # [B, H, Lq]
    den = base_w.clone()
    num = out_base.view(b, lq, heads, c // heads).to(acc) * base_w.transpose(1, 2).unsqueeze(-1)
    for g, s in scores:
        w = torch.exp(s - _at(top, g.rows, 2))                                              # [B, H, n]
        contrib = g.out.view(b, -1, heads, c // heads).to(acc) * w.transpose(1, 2).unsqueeze(-1)
        if g.rows is None:
            den = den + w
            num = num + contrib
        else:
            den = den.index_add(2, g.rows, w)
            num = num.index_add(1, g.rows, contrib)
    out = (num / den.transpose(1, 2).unsqueeze(-1)).reshape(b, lq, c).to(out_base.dtype)
    return out, top + torch.log(den)
