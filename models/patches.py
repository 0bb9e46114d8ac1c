"""The attention patches IDFusion registers on a MODEL clone.

- ``TrainingFreeReference`` (attn1 replace): the block's own self-attention becomes
  ``(1 − λ)·Attn(y, y) + λ·Σ α_i·Attn(y, cat[y, r_i])`` with the block's own projections.
- ``FlashFaceAttention`` (attn1 patch + attn1 output patch): after the block's own
  self-attention, ``x += λ·A′(y, cat[y, refs]) + (1 − λ)·A′(y, y)`` with FlashFace's trained
  extra attention A′, as in the official code. With no references (λ = 0) it still adds
  ``A′(y, y)``: the FlashFace UNet was trained with it.
- ``FusedKV`` (attn2 replace): cross-attention keys/values ``[K_text; K_f1; …]``.

A reference that counts m times (FlashFace pads to four references by repetition) adds
log m to its share of the softmax; its keys are projected and attended once. Which rows and
identities to compute is decided on the host (``RowWeights.used``): the patches read no
device tensor back, so they never synchronise with a GPU.

Each patch reads the per-call state left by ``engine.apply_model_wrapper`` in
``extra_options["idfusion_call"]``; without it (outside the schedule, or a plain call) it
computes exactly what the unpatched block computes. Patches hold block keys, never modules
of the model they were made from: the block's own projections come from the UNet being
run (``CallState.block``). Weights the pack owns (A′, adapters) sit in host patchers that
``models()`` hands to the host's memory management; ``cleanup()`` (called by the host after
sampling) drops what a patch keeps between calls.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..attention.fused_kv import fused_kv_attention, identity_bias
from ..attention.reference import reference_attention
from ..attention.routing import fit_to_latent, query_weights
from .engine import CALL, MODE_REGION, SpecCall
from .references import FlashFaceModules, Shared

logger = logging.getLogger("IDFusion")


#: The host's attention functions that add a float mask (−inf included) to every score, exactly.
#: Others (flash, sage, comfy-kitchen int8, overrides set by other nodes) may drop or approximate
#: a mask: routed calls then go to the host's PyTorch attention, which applies it.
MASK_EXACT = frozenset({"attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch",
                        "attention_xformers"})
OVERRIDE = "optimized_attention_override"
_fallback_logged: set[str] = set()


def _backend_name(fn) -> str:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return getattr(fn, "__name__", repr(fn))


def masked_backend(host, extra_options: dict):
    """(attention function, transformer_options) for a call with a routing mask: the host's own
    masked attention when it applies masks exactly and no other node overrides it, else its
    PyTorch attention without the override (logged once per reason)."""
    fn = host.optimized_attention_masked
    name = _backend_name(fn)
    if name in MASK_EXACT and OVERRIDE not in extra_options:
        return fn, extra_options
    reason = f"an attention override ({_backend_name(extra_options[OVERRIDE])})" if OVERRIDE in extra_options else name
    if reason not in _fallback_logged:
        _fallback_logged.add(reason)
        logger.info("IDFusion: identity routing needs exact attention masks; %s may not apply them, so routed "
                    "cross-attention uses PyTorch attention", reason)
    return host.attention_pytorch, {k: v for k, v in extra_options.items() if k != OVERRIDE}


def host_attention(extra_options: dict):
    """The host's optimized attention, called as ComfyUI's CrossAttention calls it (masked calls:
    see ``masked_backend``)."""
    from comfy.ldm.modules import attention as host
    precision = extra_options.get("attn_precision")

    def attend(q, k, v, heads, mask=None):
        if mask is None:
            return host.optimized_attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)
        fn, options = masked_backend(host, extra_options)
        return fn(q, k, v, heads, mask, attn_precision=precision, transformer_options=options)
    return attend


def block_key(extra_options: dict):
    block = extra_options.get("block")
    return None if block is None else (block[0], block[1], extra_options.get("block_index", 0))


#: which → (input of the patch node, what to do when its aspect ratio is not the image's)
MASK_INPUTS = {
    "masks": ("identity_masks", "set the width and height of 'IDFusion Multi-ID Masks' to the image size "
                                "(or the same aspect ratio)"),
    "region": ("position_mask", "make the face position mask at the image size (or the same aspect ratio)"),
}


def _latent_masks(call: SpecCall, which: str, masks: torch.Tensor) -> torch.Tensor:
    """Masks at the latent size of this call; an aspect-ratio error names the patch node and its input
    (it is found only now, at sampling time, where the host reports it against the sampler)."""
    cache = call.spec.routing._alpha
    key = (which, call.latent_hw)
    if key not in cache:
        name, fix = MASK_INPUTS[which]
        cache[key] = fit_to_latent(masks, *call.latent_hw, what=f"{call.spec.node}: '{name}'", fix=fix)
    return cache[key]


def spec_alpha(call: SpecCall, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query identity weights α for one spec at one layer (no strength), built on the CPU:
    (α [B|1, L|1, M] on the device; on the CPU: [B|1, M] bool, α not all zero on the row, and
    [M] bool, every α of the identity exactly 1)."""
    if seq_len in call.alphas:
        return call.alphas[seq_len]
    spec, routing = call.spec, call.spec.routing
    mix = spec.features.mix()
    m = spec.features.count
    if routing.mode == MODE_REGION:
        cache_key = ("alpha", call.latent_hw, seq_len)
        if cache_key not in routing._alpha:
            masks = _latent_masks(call, "masks", routing.masks)
            routing._alpha[cache_key] = query_weights(masks, seq_len, call.latent_hw, mix, routing.outside)
        alpha = routing._alpha[cache_key]
    elif call.per_item is not None:
        alpha = torch.nn.functional.one_hot(call.per_item, m).float().unsqueeze(1)
    else:
        alpha = mix.view(1, 1, m)
    if routing.region is not None:
        cache_key = ("region", call.latent_hw, seq_len)
        if cache_key not in routing._alpha:
            region = _latent_masks(call, "region", routing.region.reshape(1, 1, *routing.region.shape[-2:]))
            routing._alpha[cache_key] = query_weights(region, seq_len, call.latent_hw, torch.ones(1), "none")
        alpha = alpha * routing._alpha[cache_key]
    entry = (alpha.to(device, non_blocking=True), alpha.amax(dim=1) > 0, (alpha == 1).flatten(0, 1).all(dim=0))
    call.alphas[seq_len] = entry
    return entry


@dataclass
class RowWeights:
    """Every active spec's identities side by side, in spec order."""

    values: torch.Tensor        # [B, L|1, ΣM] λ_row·α on the device
    used: torch.Tensor          # [B, ΣM] bool on the CPU: the row uses the identity
    ones: torch.Tensor          # [ΣM] bool on the CPU: every value of the identity is exactly 1


def _weights(calls: list[SpecCall], seq_len: int, rows: int, device) -> RowWeights:
    values, used, ones = [], [], []
    for call in calls:
        alpha, alpha_used, alpha_ones = spec_alpha(call, seq_len, device)
        values.append(call.row_strength.view(-1, 1, 1) * alpha.expand(rows, -1, -1))
        used.append((call.row_strength_host != 0).view(-1, 1) & alpha_used.expand(rows, -1))
        ones.append(alpha_ones & bool((call.row_strength_host == 1).all()))
    length = max(p.shape[1] for p in values)
    return RowWeights(torch.cat([p.expand(-1, length, -1) for p in values], dim=-1), torch.cat(used, dim=1),
                      torch.cat(ones))


def _token_counts(calls: list[SpecCall], tokens: list[torch.Tensor]) -> list:
    """Per identity (in ``_ref_tokens`` order): runs ``(keys, log m)`` of its reference tokens, or None."""
    out = []
    per_identity = [(call, i) for call in calls for i in range(len(call.refs))]
    for (call, i), t in zip(per_identity, tokens):
        runs = call.counts[i] if call.counts else None
        if runs is None:
            out.append(None)
            continue
        per_reference = t.shape[1] // sum(n for n, _ in runs)
        out.append([(n * per_reference, log_m) for n, log_m in runs])
    return out


def _active_calls(specs, extra_options) -> list[SpecCall]:
    state = extra_options.get(CALL)
    if state is None:
        return []
    return [c for c in (state.get(s) for s in specs) if c is not None]


def _cleanup_specs(specs) -> None:
    for spec in specs:
        spec.routing._alpha.clear()


def _ref_tokens(calls: list[SpecCall], key, kind: str) -> list[torch.Tensor]:
    return [refs[(key, kind)] for call in calls for refs in call.refs]


class TrainingFreeReference(Shared):
    """attn1 replace for one block: reference attention with the block's own projections
    (those of the UNet being run)."""

    def __init__(self, key, specs: tuple):
        self.key, self.specs = key, specs

    def with_spec(self, spec) -> "TrainingFreeReference":
        return TrainingFreeReference(self.key, self.specs + (spec,))

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        attend = host_attention(extra_options)
        calls = _active_calls(self.specs, extra_options)
        if not calls:
            return attend(q, k, v, heads)
        attn1 = extra_options[CALL].block(self.key).attn1
        tokens = _ref_tokens(calls, self.key, "attn1")
        refs = [(attn1.to_k(r), attn1.to_v(r)) for r in tokens]
        weights = _weights(calls, q.shape[1], q.shape[0], q.device)
        return reference_attention(q, k, v, refs, weights.values, heads, attend, _token_counts(calls, tokens),
                                   weights.used)

    def cleanup(self):
        _cleanup_specs(self.specs)


class FlashFaceAttention(Shared):
    """FlashFace's extra attention A′ on the middle and decoder blocks (trained mode).

    ``capture`` (an attn1_patch) keeps ``y = norm1(x)`` of a patched block; the object itself
    (an attn1_output_patch) adds ``A′.o(O_s + Σ λα·σ(L_i − L_s)·(O_i − O_s))`` to the block's own
    self-attention output. Owns weights: ``models()`` lets ComfyUI load and offload them.
    """

    def __init__(self, modules: FlashFaceModules, blocks: tuple, specs: tuple = ()):
        self.modules, self.blocks, self.specs = modules, frozenset(blocks), specs
        self._y = {}

    def with_spec(self, spec) -> "FlashFaceAttention":
        return FlashFaceAttention(self.modules, tuple(self.blocks), self.specs + (spec,))

    def capture(self, n, context_attn1, value_attn1, extra_options):
        key = block_key(extra_options)
        if key in self.blocks:
            self._y[key] = n
        return n, context_attn1, value_attn1

    def __call__(self, n, extra_options):
        key = block_key(extra_options)
        if key not in self.blocks or key not in self._y:
            return n
        y = self._y.pop(key)
        attn = self.modules.extra_attention(key)
        heads = extra_options["n_heads"]
        attend = host_attention(extra_options)
        q, k, v = attn.to_q(y), attn.to_k(y), attn.to_v(y)
        calls = _active_calls(self.specs, extra_options)
        if calls:
            tokens = _ref_tokens(calls, key, "attn1")
            refs = [(attn.to_k(r), attn.to_v(r)) for r in tokens]
            weights = _weights(calls, q.shape[1], q.shape[0], q.device)
            o = reference_attention(q, k, v, refs, weights.values, heads, attend, _token_counts(calls, tokens),
                                    weights.used)
        else:
            o = attend(q, k, v, heads)
        return n + attn.to_out(o)

    def models(self):
        return [self.modules.patcher]

    def to(self, device_or_dtype):
        return self

    def cleanup(self):
        self._y.clear()
        _cleanup_specs(self.specs)


class FusedKV(Shared):
    """attn2 replace for one block: face tokens join the text tokens under one softmax.

    entries: ``(spec, projection)`` per patch node — the maps ``h_f → K_f, V_f``: ``None`` for
    training-free (the self-attention ``to_k``/``to_v`` of the block being run), or a pair of
    trained adapter layers, whose host patchers are in ``patchers`` so ComfyUI loads and
    offloads them.
    """

    def __init__(self, key, entries: tuple, patchers: tuple = ()):
        self.key, self.entries, self.patchers = key, entries, patchers
        self.specs = tuple(e[0] for e in entries)

    def with_entry(self, spec, projection=None, patcher=None) -> "FusedKV":
        patchers = self.patchers + ((patcher,) if patcher is not None and patcher not in self.patchers else ())
        return FusedKV(self.key, self.entries + ((spec, projection),), patchers)

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        attend = host_attention(extra_options)
        state = extra_options.get(CALL)
        active = []
        if state is not None:
            for spec, projection in self.entries:
                call = state.get(spec)
                if call is not None:
                    if projection is None:
                        attn1 = state.block(self.key).attn1
                        projection = (attn1.to_k, attn1.to_v)
                    active.append((call, *projection))
        if not active:
            return attend(q, k, v, heads)
        calls = [a[0] for a in active]
        weights = _weights(calls, q.shape[1], q.shape[0], q.device)                       # values [B, L|1, M]
        used = weights.used.any(dim=0).tolist()                                            # [M], on the host
        if not any(used):
            return attend(q, k, v, heads)
        projected = [(kf, vf, refs[(self.key, "attn2")]) for call, kf, vf in active for refs in call.refs]
        keep = [i for i, u in enumerate(used) if u]
        faces = [(kf(h.to(q.dtype)), vf(h.to(q.dtype))) for kf, vf, h in (projected[i] for i in keep)]
        counts = _token_counts(calls, [p[2] for p in projected])
        counts = [counts[i] for i in keep]
        bias = None
        if not bool(weights.ones[keep].all()) or any(counts):
            values = weights.values
            if len(keep) < len(used):
                values = torch.cat([values[:, :, i:i + 1] for i in keep], dim=-1)
            bias = identity_bias(values, k.shape[1], [f[0].shape[1] for f in faces], 1.0, q.dtype, counts)
        return fused_kv_attention(q, k, v, faces, bias, heads, attend)

    def models(self):
        return list(self.patchers)

    def to(self, device_or_dtype):
        return self

    def cleanup(self):
        _cleanup_specs(self.specs)
