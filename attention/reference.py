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

References that count several times (FlashFace pads fewer than four references to four by
repetition) are counted, not duplicated: ``counts`` adds log m to the log-sum-exp of a
reference repeated m times, which is the attention over the padded keys.

Which rows use which identity is decided on the host (``used``, a CPU tensor the caller
knows from its strengths and routes): rows are picked by slicing contiguous runs, so nothing
here reads a device tensor back to the host (no synchronisation on a GPU).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .lse import accumulation_dtype, attention_lse, attention_lse_counted

#: ``fn(q, k, v, heads) -> out`` on ``[B, L, H·D]`` tensors: the host's attention.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
#: Runs ``(number of keys, log m)`` covering one identity's reference keys in order.
Counts = Sequence[tuple[int, float]]


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


def rows_used(weights: torch.Tensor) -> torch.Tensor:
    """[B, M] bool on the CPU: rows whose weights for identity i are not all zero. Reads
    ``weights`` back to the host: callers that know it (strengths, routes) pass ``used``."""
    return (weights.abs().amax(dim=1) > 0).cpu()


def row_runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of consecutive True flags."""
    runs, start = [], None
    for i, flag in enumerate(list(flags) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def take_rows(t: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """The rows of t in ``runs`` (slices, no index tensor); t with batch 1 is shared: as is."""
    if t.shape[0] == 1:
        return t
    if len(runs) == 1:
        start, end = runs[0]
        return t if (start, end) == (0, t.shape[0]) else t[start:end]
    return torch.cat([t[start:end] for start, end in runs])


def interleave(flags: Sequence[bool], chosen: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Rows in order: the flagged ones from ``chosen`` (in order), the rest from ``others`` (in order)."""
    pieces, taken, start = [], {True: 0, False: 0}, 0
    for end in range(1, len(flags) + 1):
        if end == len(flags) or bool(flags[end]) != bool(flags[start]):
            flag, n = bool(flags[start]), end - start
            pieces.append((chosen if flag else others)[taken[flag]:taken[flag] + n])
            taken[flag] += n
            start = end
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _identity_part(q, k_i, v_i, counts_i, used_i: list[bool], o_self, heads):
    """(O_i, L_i) for the rows that use identity i; other rows get (O_s, −inf): no share."""
    if not any(used_i):
        return None
    if all(used_i):
        return attention_lse_counted(q, k_i, v_i, heads, counts_i)
    rows = row_runs(used_i)
    o_u, lse_u = attention_lse_counted(take_rows(q, rows), take_rows(k_i, rows), take_rows(v_i, rows), heads, counts_i)
    others = [not u for u in used_i]
    no_share = torch.full((sum(others),) + lse_u.shape[1:], float("-inf"), device=lse_u.device, dtype=lse_u.dtype)
    return interleave(used_i, o_u, take_rows(o_self, row_runs(others))), interleave(used_i, lse_u, no_share)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        refs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        weights: torch.Tensor, heads: int, attention: AttentionFn,
                        counts: Sequence[Counts | None] | None = None,
                        used: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention of q over (k, v) blended with attention over each identity's references.

    q, k, v: [B, L, H·D] (already projected); refs[i] = (k_i, v_i), each [B or 1, R_i, H·D];
    weights: [B, Lq or 1, M] = λ·α (see module docstring); counts[i]: runs ``(keys, log m)``
    over identity i's keys (None: each key once); used: [B, M] bool on the CPU, which rows use
    which identity (``rows_used(weights)`` when None). Rows that use no identity are computed by
    ``attention`` (the host's own kernel); when no row has a reference the call is exactly the
    host's (what the unpatched block computes); the other rows use the log-sum-exp merge.
    """
    m = weights.shape[-1]
    if len(refs) != m:
        raise ValueError(f"{len(refs)} identities' references but weights for {m}")
    if counts is not None and len(counts) != m:
        raise ValueError(f"{len(counts)} identities' counts but weights for {m}")
    used = rows_used(weights) if used is None else used
    if tuple(used.shape) != (q.shape[0], m):
        raise ValueError(f"used must be [{q.shape[0]}, {m}] (rows × identities), got {tuple(used.shape)}")
    flags = used.any(dim=1).tolist()
    if not any(flags):
        return attention(q, k, v, heads)
    rows = row_runs(flags)
    qa, ka, va, wa = (take_rows(t, rows) for t in (q, k, v, weights))
    used_a = used[torch.tensor(flags)]
    o_self, lse_self = attention_lse(qa, ka, va, heads)
    parts = [_identity_part(qa, take_rows(k_i, rows), take_rows(v_i, rows), None if counts is None else counts[i],
                            used_a[:, i].tolist(), o_self, heads)
             for i, (k_i, v_i) in enumerate(refs)]
    out_active = blend(o_self, lse_self, parts, wa, heads)
    if all(flags):
        return out_active
    rest = row_runs([not f for f in flags])
    out_rest = attention(take_rows(q, rest), take_rows(k, rest), take_rows(v, rest), heads)
    return interleave(flags, out_active, out_rest)
