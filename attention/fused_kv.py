"""Fused keys/values (face-fusion eqs. 2–7): reference-face tokens join the text tokens of
cross-attention under one softmax.

    K = [K_text; K_f1; …; K_fM],  V = [V_text; V_f1; …; V_fM]

Identity weights and routing enter as an additive bias on the logits of each identity's
keys: ``log(weight·α_i(q))``. A weight of 0, or a query routed away from identity i
(α_i(q) = 0), gives −inf: exactly zero attention to those keys. A reference that counts m
times (padded by repetition) gets log m more on its keys. Text keys always stay
available, so no query is ever left without keys.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .reference import AttentionFn, Counts


def identity_bias(alpha: torch.Tensor, text_len: int, ref_lens: Sequence[int], weight: float,
                  dtype: torch.dtype, counts: Sequence[Counts | None] | None = None) -> torch.Tensor:
    """Additive bias ``[B|1, Lq|1, text_len + ΣR_i]``.

    alpha: [B|1, Lq|1, M] per-query identity weights (mixing × routing), ≥ 0. counts[i]: runs
    ``(keys, log m)`` over identity i's keys: a reference that counts m times gets log m more
    (None: each key once). All zeros when every scaled weight is 1 and nothing counts twice:
    callers that know this on the host skip the bias.
    """
    acc = torch.promote_types(dtype, torch.float32)
    scaled = (alpha.to(acc) * weight).clamp_min(0)
    logs = torch.log(scaled)                                               # 0 → −inf
    pieces = [torch.zeros(*scaled.shape[:2], text_len, dtype=acc, device=alpha.device)]
    for i, n in enumerate(ref_lens):
        runs = None if counts is None else counts[i]
        if not runs:
            pieces.append(logs[:, :, i:i + 1].expand(-1, -1, n))
            continue
        if sum(length for length, _ in runs) != n:
            raise ValueError(f"identity {i}: counts cover {sum(length for length, _ in runs)} keys but it has {n}")
        pieces += [(logs[:, :, i:i + 1] + log_m).expand(-1, -1, length) for length, log_m in runs]
    return torch.cat(pieces, dim=-1).to(dtype)


def fused_kv_attention(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                       faces: Sequence[tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor | None,
                       heads: int, attention: AttentionFn) -> torch.Tensor:
    """One softmax over text and face keys. q: [B, Lq, C]; k/v_text: [B, T, C];
    faces[i] = (K_fi, V_fi) each [B|1, R_i, C]; bias from ``identity_bias``."""
    b = q.shape[0]
    ks = [k_text] + [k.expand(b, -1, -1) for k, _ in faces]
    vs = [v_text] + [v.expand(b, -1, -1) for _, v in faces]
    k = torch.cat(ks, dim=1)
    v = torch.cat(vs, dim=1)
    if bias is None:
        return attention(q, k, v, heads)
    if bias.shape[0] != b:
        bias = bias.expand(b, -1, -1)
    if bias.shape[1] != q.shape[1]:
        bias = bias.expand(-1, q.shape[1], -1)
    return attention(q, k, v, heads, mask=bias)
