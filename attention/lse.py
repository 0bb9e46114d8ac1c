"""Attention that also returns the log-sum-exp of its scores.

Two attentions over disjoint key sets, ``(O_a, L_a)`` and ``(O_b, L_b)``, merge into the
attention over the union of their keys without recomputing anything:

    Attn(q, [a; b]) = σ(L_a − L_b)·O_a + σ(L_b − L_a)·O_b

which is how the λ-blend of reference attention costs one attention over the
concatenated keys instead of two full attentions. Keys that appear m times in the softmax
(a reference repeated m times) are the same keys with log m added to their logits, so
``L + log m`` stands for them without duplicating a key (``attention_lse_counted``).

Layout follows ComfyUI's attention functions: q, k, v are ``[B, L, H·D]``; the outputs are
``out [B, Lq, H·D]`` and ``lse [B, H, Lq]`` (natural log, float32; float64 for float64
inputs: the arithmetic is never less precise than the input).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

logger = logging.getLogger("IDFusion")

#: Queries per chunk in the plain-torch fallback (bounds its [chunk, Lk] score matrix).
FALLBACK_QUERY_CHUNK = 1024
_warned: set[str] = set()


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and single precision inputs, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


def as_additive_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as an additive bias: boolean (True = attend) → 0 / −inf; floats as they are."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _bias_rows(bias: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Query rows ``start:stop`` of a bias broadcastable to ``[B, H, Lq, Lk]``."""
    bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
    return bias if bias.shape[2] == 1 else bias[:, :, start:stop]


def attention_lse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation on ``[B, H, L, D]`` tensors, chunked over queries. ``bias``: an
    additive (or boolean) mask broadcastable to ``[B, H, Lq, Lk]``, as the host passes them."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = accumulation_dtype(q.dtype)
    if bias is not None:
        bias = as_additive_bias(bias, acc)
    outs, lses = [], []
    for start in range(0, q.shape[2], FALLBACK_QUERY_CHUNK):
        qc = q[:, :, start:start + FALLBACK_QUERY_CHUNK].to(acc)
        scores = torch.matmul(qc, k.to(acc).transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + _bias_rows(bias, start, start + qc.shape[2])
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        outs.append(torch.matmul(probs, v.to(acc)).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _cpu_kernel(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, lse


def _cuda_kernel(q, k, v):
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    return out, lse[:, :, :q.shape[2]]


def _kernel_for(device: torch.device):
    if device.type == "cpu":
        return _cpu_kernel
    if device.type == "cuda":
        return _cuda_kernel
    return None


def attention_lse_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with log-sum-exp on ``[B, H, L, D]`` tensors: ``(out [B,H,Lq,D], lse [B,H,Lq])``.

    Uses torch's fused kernels that expose the log-sum-exp (CPU flash, CUDA flash or
    memory-efficient); any other device, or a kernel that refuses the input, falls back to
    a chunked plain-torch computation (logged once per reason). With a ``bias`` (see
    ``attention_lse_math``) it is the plain-torch computation.
    """
    if bias is not None:
        return attention_lse_math(q, k, v, bias)
    kernel = _kernel_for(q.device)
    if kernel is not None:
        try:
            out, lse = kernel(q.contiguous(), k.contiguous(), v.contiguous())
            if out.shape == q.shape[:3] + (v.shape[-1],) and lse.shape == q.shape[:3]:
                return out, lse.to(accumulation_dtype(q.dtype))
            reason = f"unexpected kernel output shapes {tuple(out.shape)}, {tuple(lse.shape)}"
        except RuntimeError as err:
            reason = f"{q.device.type} {q.dtype} kernel refused: {err}".splitlines()[0]
        if reason not in _warned:
            _warned.add(reason)
            logger.warning("IDFusion attention: falling back to plain torch (%s)", reason)
    return attention_lse_math(q, k, v)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with log-sum-exp on ComfyUI's ``[B, L, H·D]`` layout.

    Returns ``out [B, Lq, H·D]`` and ``lse [B, H, Lq]``. k and v may have batch 1 while q has
    batch B (shared keys, e.g. reference features): they are broadcast.
    """
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    if kh.shape[0] != qh.shape[0]:
        kh = kh.expand(qh.shape[0], -1, -1, -1)
        vh = vh.expand(qh.shape[0], -1, -1, -1)
    out, lse = attention_lse_heads(qh, kh, vh)
    return _merge_heads(out), lse


def merge_weight(lse_self: torch.Tensor, lse_other: torch.Tensor) -> torch.Tensor:
    """σ(L_other − L_self): the share of attention mass the other keys take in the union."""
    return torch.sigmoid(lse_other - lse_self)


def merge_lse(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of disjoint key sets from each set's attention.

    parts[j] = (out_j [B, Lq, H·D], lse_j [B, H, Lq]); returns ``(Σ_j e^(L_j − L)·O_j, L)`` with
    ``L = log Σ_j e^(L_j)``: out in the parts' dtype (summed in the accumulation dtype), lse as given.
    """
    if len(parts) == 1:
        return parts[0]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    b, lq, c = parts[0][0].shape
    dtype = parts[0][0].dtype
    acc = accumulation_dtype(dtype)
    out = torch.zeros(b, lq, heads, c // heads, dtype=acc, device=lse.device)
    for o, part_lse in parts:
        share = torch.exp(part_lse - lse).transpose(1, 2).unsqueeze(-1).to(acc)      # [B, Lq, H, 1]
        out = out + share * o.view(b, lq, heads, c // heads).to(acc)
    return out.to(dtype).view(b, lq, c), lse


def attention_lse_counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                          counts: Sequence[tuple[int, float]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_lse`` where keys count several times in the softmax.

    counts: runs ``(length, log m)`` that cover k's keys in order: the keys of a run count m
    times each (a reference repeated m times), as if they were there m times. None: once each.
    One attention when every run has the same m (its log m is added to L), one per run otherwise.
    """
    if not counts:
        return attention_lse(q, k, v, heads)
    if sum(length for length, _ in counts) != k.shape[1]:
        raise ValueError(f"counts cover {sum(n for n, _ in counts)} keys but there are {k.shape[1]}")
    logs = {log_m for _, log_m in counts}
    if len(logs) == 1:
        out, lse = attention_lse(q, k, v, heads)
        log_m = logs.pop()
        return out, (lse + log_m if log_m else lse)
    parts, start = [], 0
    for length, log_m in counts:
        out, lse = attention_lse(q, k[:, start:start + length], v[:, start:start + length], heads)
        parts.append((out, lse + log_m))
        start += length
    return merge_lse(parts, heads)
