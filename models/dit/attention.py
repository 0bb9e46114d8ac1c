"""The joint attention of a patched DiT block, computed from the hooks' layout.

The host hands its attention function rotated queries and keys ``[B, H, L, D]``; ``attn1_patch``
(``engine.LayoutRecorder``) has said where the tokens are. Keys: ``[text T | image X |
native references R_1 … R_n]``; queries: the same, or without the references when the host's
FluxKVCache serves them from its cache. ``RoutedAttention`` (the call's
``optimized_attention_override``) computes, for the blocks a spec acts on:

1. **People** (native references grouped by person, ``engine.PeopleSpec``): one softmax over all
   keys with the log-bias ``log w_p(q)`` on person p's keys (``attention.groups``): text rows
   ``w = s_p``; image rows ``s_p·α_p(q)`` with α the token owner of the identity masks (queries
   outside every region see every person, or none); a person's own reference rows ``w = 1``;
   other reference rows ``s_p`` (unrouted) or nothing (routed: no person's references look at
   another's, nor do the shared ones). Shared references (chained before the node) and the
   image stay plain keys. ``s_p = 0`` removes person p's references exactly: nothing but
   their own tokens attends to them.
2. **Training-free references** (``engine.ReferenceSpec``): on the image rows, FlashFace's blend
   ``O_s + Σ_i λ·α_i·σ(L_i − L_s)·(O_i − O_s)`` (``attention.reference.blend``) of the block's own
   attention (after step 1) with each identity's reference keys/values from the reference pass.

Every other call — blocks no spec selects, other models' attention — goes to the previous
override or the host's own function untouched.
"""
from __future__ import annotations

import torch

from ...attention.groups import Group, merge_groups
from ...attention.lse import attention_lse_heads
from ...attention.reference import blend
from ...attention.routing import fit_to_latent, query_weights
from ..engine import MODE_REGION
from ..patches import spec_alpha
from ..references import Shared
from .engine import BlockLayout, DitCall, PeopleCall


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _host_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The host's mask as a 4-D ``[B|1, H|1, Lq|1, Lk]`` bias, shaped as its attention shapes it."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


def _mask_part(mask: torch.Tensor | None, rows: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    if mask is None:
        return None
    part = mask[..., start:stop]
    return part if rows is None or part.shape[2] == 1 else part.index_select(2, rows)


# --- people -----------------------------------------------------------------------------------

def _person_ranges(layout: BlockLayout, people: PeopleCall, image_end: int) -> tuple[int, list[tuple[int, int]]]:
    """End of the shared keys, and each person's key range ``[start, stop)``."""
    tokens = layout.ref_tokens
    shared_end = image_end + sum(tokens[:people.spec.shared])
    ranges, start, first = [], shared_end, people.spec.shared
    for count in people.spec.counts:
        stop = start + sum(tokens[first:first + count])
        ranges.append((start, stop))
        start, first = stop, first + count
    return shared_end, ranges


def _region_alpha(people: PeopleCall, image_tokens: int, device) -> torch.Tensor:
    """[1, X, P]: 1 where the image token belongs to person p (outside: all or none); all 1 unrouted."""
    spec = people.spec
    count = len(spec.counts)
    if spec.routing.mode != MODE_REGION:
        return torch.ones(1, image_tokens, count, device=device)
    key = (people.latent_hw, image_tokens)
    if key not in spec._alpha:
        masks = fit_to_latent(spec.routing.masks, *people.latent_hw, what="identity masks")
        spec._alpha[key] = query_weights(masks, image_tokens, people.latent_hw, torch.ones(count), spec.routing.outside)
    return spec._alpha[key].to(device)


def people_log_weights(people: PeopleCall, layout: BlockLayout, q_len: int, image_end: int,
                       ranges: list[tuple[int, int]], shared_end: int, device) -> torch.Tensor:
    """``log w [B, Lq, P]`` of every query row on every person's keys (see the module docstring)."""
    key = (q_len, image_end, layout.txt, layout.ref_tokens)
    if key in people.log_weights:
        return people.log_weights[key]
    txt, count = layout.txt, len(ranges)
    rows = people.row_on.shape[0]
    strengths = torch.tensor(people.spec.strengths, dtype=torch.float32, device=device)
    on = people.row_on.to(device).view(rows, 1, 1)
    w = torch.zeros(rows, q_len, count, device=device)
    w[:, :txt] = strengths
    w[:, txt:image_end] = strengths * _region_alpha(people, image_end - txt, device)
    if q_len > image_end:
        routed = people.spec.routing.mode == MODE_REGION
        w[:, image_end:] = 0.0 if routed else strengths
        for p, (start, stop) in enumerate(ranges):
            w[:, start:stop, p] = 1.0
    log_w = torch.log(w * on)
    people.log_weights[key] = log_w
    return log_w


def _acts(people: PeopleCall) -> bool:
    """False when every weight is 1 (unrouted, strengths 1, every row): the native attention itself."""
    unrouted = people.spec.routing.mode != MODE_REGION
    return not (unrouted and all(s == 1.0 for s in people.spec.strengths) and bool((people.row_on == 1).all()))


def routed_attention(q, k, v, heads: int, mask, layout: BlockLayout, people: PeopleCall,
                     image_end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """People's references under their log-weights (``attention.groups``): ``(out [B, Lq, H·D], lse [B, H, Lq])``."""
    q_len = q.shape[2]
    shared_end, ranges = _person_ranges(layout, people, image_end)
    log_w = people_log_weights(people, layout, q_len, image_end, ranges, shared_end, q.device)
    out0, lse0 = attention_lse_heads(q, k[:, :, :shared_end], v[:, :, :shared_end],
                                     _mask_part(mask, None, 0, shared_end))
    groups = []
    for p, (start, stop) in enumerate(ranges):
        lw = log_w[:, :, p]
        seen = (lw > float("-inf")).any(dim=0)
        if stop == start or not bool(seen.any()):
            continue
        rows = None if bool(seen.all()) else seen.nonzero().squeeze(1)
        qr = q if rows is None else q.index_select(2, rows)
        out, lse = attention_lse_heads(qr, k[:, :, start:stop], v[:, :, start:stop],
                                       _mask_part(mask, rows, start, stop))
        groups.append(Group(rows, _merge_heads(out), lse, lw if rows is None else lw.index_select(1, rows)))
    return merge_groups(_merge_heads(out0), lse0, groups, heads)


# --- training-free references -----------------------------------------------------------------

def _identity_part(q_img, k_ref, v_ref, used, o_img, heads):
    """(O_i [B, X, H·D], L_i [B, H, X]) for the batch rows that use the identity; others (O_s, −inf)."""
    if not bool(used.any()):
        return None
    if bool(used.all()):
        out, lse = attention_lse_heads(q_img, k_ref.expand(q_img.shape[0], -1, -1, -1),
                                       v_ref.expand(q_img.shape[0], -1, -1, -1))
        return _merge_heads(out), lse
    rows = used.nonzero().squeeze(1)
    n = len(rows)
    out, lse = attention_lse_heads(q_img[rows], k_ref.expand(n, -1, -1, -1), v_ref.expand(n, -1, -1, -1))
    o_i = o_img.clone()
    o_i[rows] = _merge_heads(out).to(o_i.dtype)
    lse_i = torch.full((q_img.shape[0],) + tuple(lse.shape[1:]), float("-inf"), device=lse.device, dtype=lse.dtype)
    lse_i[rows] = lse
    return o_i, lse_i


def reference_blend(q, out, lse, heads: int, block, calls, txt: int, image_end: int) -> torch.Tensor:
    """The image rows of ``out`` blended with every identity's references (FlashFace's λ-blend)."""
    image = slice(txt, image_end)
    q_img = q[:, :, image]
    rows, tokens = q.shape[0], image_end - txt
    weights, parts = [], []
    o_img, lse_img = out[:, image], lse[:, :, image]
    for call in calls:
        alpha = spec_alpha(call, tokens, q.device)[0]
        w = call.row_strength.view(-1, 1, 1).to(q.device) * alpha.expand(rows, -1, -1)
        for i, refs in enumerate(call.refs):
            used = w[:, :, i].abs().amax(dim=1) > 0
            parts.append(_identity_part(q_img, refs[(block, "k")], refs[(block, "v")], used, o_img, heads))
        weights.append(w)
    length = max(w.shape[1] for w in weights)
    blended = blend(o_img, lse_img, parts, torch.cat([w.expand(-1, length, -1) for w in weights], dim=-1), heads)
    out = out.clone()
    out[:, image] = blended
    return out


# --- the override -----------------------------------------------------------------------------

def block_attention(call: DitCall, layout: BlockLayout, q, k, v, heads: int, mask) -> torch.Tensor | None:
    """The block's attention output ``[B, Lq, H·D]``, or None when no spec acts here (or the layout
    is not one this engine knows: the host computes it then)."""
    txt, q_len, k_len = layout.txt, q.shape[2], k.shape[2]
    image_end = k_len - sum(layout.ref_tokens)
    if image_end <= txt or q_len not in (k_len, image_end) or k.shape[2] != v.shape[2]:
        return None
    people = call.people
    if people is not None and not (layout.ref_tokens and layout.block in people.spec.blocks and _acts(people)):
        people = None
    calls = [c for c in call.references if layout.block in c.spec.blocks]
    if people is None and not calls:
        return None
    mask = _host_mask(mask)
    if people is not None:
        out, lse = routed_attention(q, k, v, heads, mask, layout, people, image_end)
    else:
        o, lse = attention_lse_heads(q, k, v, mask)
        out = _merge_heads(o)
    if calls:
        out = reference_blend(q, out, lse, heads, layout.block, calls, txt, image_end)
    return out


class RoutedAttention(Shared):
    """``optimized_attention_override`` for one call: ``block_attention`` where a spec acts, the
    previous override (or the host's function) everywhere else."""

    def __init__(self, call: DitCall, previous=None):
        self.call, self.previous = call, previous

    def __call__(self, func, *args, **kwargs):
        q, k, v, heads = args[:4]
        options = kwargs.get("transformer_options") or {}
        block = (options.get("block_type"), options.get("block_index"), 0)
        layout = self.call.take(block)
        if layout is not None and kwargs.get("skip_reshape") and q.ndim == 4:
            mask = args[4] if len(args) > 4 else kwargs.get("mask")
            out = block_attention(self.call, layout, q, k, v, heads, mask)
            if out is not None:
                if kwargs.get("skip_output_reshape"):
                    return out.view(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
                return out
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)
