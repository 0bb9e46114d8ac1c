"""Sampling-time engine: what a patched MODEL needs at every UNet call.

A patch node adds a ``Spec`` (which identities, which blocks, which features, how strong,
when, routed how) to the MODEL's ``Plan`` (kept in ``transformer_options``). One wrapper
around ``BaseModel._apply_model`` then, for each call:

1. feeds FlashFace's face-position channel when the UNet has one extra input channel;
2. for the specs active at this sigma, gets each identity's reference features for the
   current timestep — from the cache, or by one reference pass per identity for the union
   of the features all specs need — and moves them to the device once;
3. works out, per batch row, which rows get references (the guider may give them to one
   branch only) and λ — on the host, from the strengths and ``cond_or_uncond``, so the
   attention patches never read a device tensor back (no host-device synchronisation);

and leaves it in ``transformer_options["idfusion_call"]`` for the attention patches. The one
device→host read of a call is the sigma and its timestep (``step_values``): the cache key
needs the timestep on the host.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field

import torch

from .feature_cache import FEATURE_CACHE, CacheKey, FeatureKey, Features
from .fingerprint import weights_fingerprint
from .references import FLASHFACE, ReferenceFeatures, ReferenceIdentity, Shared
from .reference_pass import reference_forward
from .unet_layout import block_modules

logger = logging.getLogger("IDFusion")

PLAN = "idfusion_plan"
CALL = "idfusion_call"
GUIDANCE = "idfusion_guidance"
POSITION = "idfusion_position_mask"
#: The node that sets POSITION (its display name starts errors found at sampling time).
REFERENCE_NODE = "IDFusion Reference Attention"

MODE_MIX = "mix (weights)"
MODE_PER_ITEM = "per batch item"
MODE_REGION = "by region (identity masks)"
IDENTITY_MODES = (MODE_MIX, MODE_PER_ITEM, MODE_REGION)


@dataclass(frozen=True, eq=False)
class Routing(Shared):
    """How queries pick identities. masks: [M, H, W] at image size (MODE_REGION); region:
    [H, W] or [B, H, W] where references apply at all (None = everywhere)."""

    mode: str = MODE_MIX
    masks: torch.Tensor | None = None
    outside: str = "all"
    region: torch.Tensor | None = None
    _alpha: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)
class Spec(Shared):
    """One patch node's request. kind: ``reference`` (reference attention) or ``fused_kv``; node:
    the patch node's display name, which starts every error found only at sampling time."""

    kind: str
    features: ReferenceFeatures
    blocks: tuple
    feature_kind: str
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    routing: Routing = field(default_factory=Routing)
    node: str = "IDFusion"

    def needs(self) -> set[FeatureKey]:
        return {(b, self.feature_kind) for b in self.blocks}


@dataclass(frozen=True, eq=False)
class Plan(Shared):
    specs: tuple[Spec, ...] = ()

    def with_spec(self, spec: Spec) -> "Plan":
        return Plan(self.specs + (spec,))


@dataclass(frozen=True)
class Guidance:
    """Set by the reference guider per prediction: which cond indices get references — reference
    attention and fused keys/values alike (None = all rows) — and an optional λ that replaces
    reference attention's strength."""

    ref_conds: frozenset | None = None
    strength: float | None = None


@dataclass
class SpecCall:
    """A spec's state for one UNet call. Tensors named ``*_host`` live on the CPU: the patches
    decide with them which rows and identities to compute, without reading the device."""

    spec: Spec
    row_strength: torch.Tensor                                  # [B] λ (or weight) per row, 0 = off; device
    refs: list[dict[FeatureKey, torch.Tensor]]                  # per identity: (block, kind) → [1, N·L, C]
    latent_hw: tuple[int, int]
    row_strength_host: torch.Tensor                             # [B] the same on the CPU
    per_item: torch.Tensor | None = None                        # [B] identity index per row (MODE_PER_ITEM), CPU
    counts: list = field(default_factory=list)                  # per identity: ((references, log m), …) or None
    alphas: dict = field(default_factory=dict)                  # seq_len → (α [B|1, L|1, M] device, used, ones)


@dataclass
class CallState:
    specs: dict[int, SpecCall]                                  # id(spec) → state
    unet: torch.nn.Module | None = None                         # the UNet being run

    def get(self, spec: Spec) -> SpecCall | None:
        return self.specs.get(id(spec))

    def block(self, key):
        """The BasicTransformerBlock ``key`` of the UNet being run (patches never keep modules
        of the model they were made from: the host may clone it, move it or swap its weights)."""
        return block_modules(self.unet)[key]


# --- reference features for one call ---------------------------------------------------------

def _run_pass(base_model, features: ReferenceFeatures, ident: ReferenceIdentity, timestep: float,
              needed: set[FeatureKey], device, dtype) -> Features:
    unet = base_model.diffusion_model
    refnet = features.refnet
    if refnet.kind == FLASHFACE:
        ref_module = refnet.modules.module
        input_blocks, output_blocks = ref_module.input_blocks, ref_module.output_blocks
    else:
        input_blocks, output_blocks = unet.input_blocks, unet.output_blocks
    n = ident.count
    x = ident.latents.to(device=device, dtype=dtype)
    context = ident.context.to(device=device, dtype=dtype).expand(n, -1, -1)
    y = None if ident.y is None else ident.y.to(device=device, dtype=dtype).expand(n, -1)
    t = torch.full((n,), timestep, device=device, dtype=torch.float32)
    with torch.no_grad():
        out = reference_forward(unet, input_blocks, output_blocks, x, t, context, y, needed)
    FEATURE_CACHE.count("reference_passes")
    missing = needed - out.keys()
    if missing:
        raise RuntimeError(f"IDFusion: the reference pass did not reach blocks {sorted(missing)[:4]}")
    return {k: v.contiguous() for k, v in out.items()}    # one memory layout for fresh, cached and disk features


def identity_features(base_model, features: ReferenceFeatures, ident: ReferenceIdentity, timestep: float,
                      needed: set[FeatureKey], device, dtype) -> Features:
    """Features of one identity at one timestep: memory cache, disk cache, or a reference pass."""
    key = CacheKey(ident.digest, weights_fingerprint(base_model, features.refnet),
                   round(float(timestep), 4), ident.context_digest)
    entry, fresh = FEATURE_CACHE.lookup(key, needed, ident.disk_cache,
                                        lambda: _run_pass(base_model, features, ident, timestep, needed, device, dtype))
    if fresh is not None:
        return {k: fresh[k] for k in needed}
    return {k: entry[k].to(device=device, dtype=dtype, non_blocking=True) for k in needed}


def _as_tokens(t: torch.Tensor) -> torch.Tensor:
    """[N, L, C] → [1, N·L, C]: all references of an identity as one key sequence."""
    return t.reshape(1, -1, t.shape[-1])


# --- rows ------------------------------------------------------------------------------------

def row_conds(cond_or_uncond: list, rows: int) -> torch.Tensor:
    """The cond index of each batch row: rows are laid out cond-major in ComfyUI's calls."""
    per = rows // max(1, len(cond_or_uncond))
    return torch.tensor([c for c in cond_or_uncond for _ in range(per)], dtype=torch.long)


def row_items(cond_or_uncond: list, rows: int) -> torch.Tensor:
    per = rows // max(1, len(cond_or_uncond))
    return torch.arange(rows) % max(1, per)


_percent_sigmas: "weakref.WeakKeyDictionary[torch.nn.Module, dict[float, float]]" = weakref.WeakKeyDictionary()


def percent_to_sigma(model_sampling, percent: float) -> float:
    """``model_sampling.percent_to_sigma``, remembered per model sampling (the host computes it
    on the device and reads it back: once per value, not at every call)."""
    known = _percent_sigmas.setdefault(model_sampling, {})
    if percent not in known:
        known[percent] = float(model_sampling.percent_to_sigma(percent))
    return known[percent]


def spec_active(spec: Spec, base_model, sigma: float) -> bool:
    ms = base_model.model_sampling
    return percent_to_sigma(ms, spec.end_percent) <= sigma <= percent_to_sigma(ms, spec.start_percent)


def step_values(base_model, sigma: torch.Tensor) -> tuple[float, float, bool]:
    """(σ of the first row, its timestep, whether every row has that σ): the one device→host
    read of a UNet call, in a single transfer."""
    s = sigma.reshape(-1)
    timestep = base_model.model_sampling.timestep(s[:1]).reshape(1).float()
    uniform = (s == s[:1]).all().reshape(1).float()
    sig, t, same = torch.cat([s[:1].float(), timestep.to(s.device), uniform]).cpu().tolist()
    return sig, t, bool(same)


def log_runs(ident: ReferenceIdentity) -> tuple[tuple[int, float], ...] | None:
    """An identity's runs of equally counted references as ``(references, log m)``."""
    runs = ident.runs
    return None if runs is None else tuple((n, math.log(c)) for n, c in runs)


def _row_strength(spec: Spec, conds: torch.Tensor, guidance: Guidance | None) -> torch.Tensor:
    """Per row: the spec's strength where the guider gives references (all rows without a
    guider), 0 elsewhere. The guider's λ replaces reference attention's strength only."""
    strength = spec.strength
    on = torch.ones(len(conds), dtype=torch.bool)
    if guidance is not None:
        if guidance.strength is not None and spec.kind == "reference":
            strength = guidance.strength
        if guidance.ref_conds is not None:
            on = torch.tensor([int(c) in guidance.ref_conds for c in conds], dtype=torch.bool)
    return on.float() * strength


def prepare_call(base_model, plan: Plan, x: torch.Tensor, sigma: torch.Tensor, transformer_options: dict) -> CallState:
    """Features and per-row state for every spec active at this sigma (see module docstring)."""
    sig, timestep, uniform = step_values(base_model, sigma)
    if not uniform:
        logger.debug("IDFusion: rows at different sigmas in one call; reference features use sigma %.4f", sig)
    cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
    conds = row_conds(cond_or_uncond, x.shape[0])
    guidance = transformer_options.get(GUIDANCE)
    strengths = {id(s): _row_strength(s, conds, guidance) for s in plan.specs if spec_active(s, base_model, sig)}
    active = [s for s in plan.specs if id(s) in strengths and bool((strengths[id(s)] != 0).any())]
    if not active:
        return CallState({}, base_model.diffusion_model)
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    device = x.device

    needed: dict[tuple[int, int], tuple[ReferenceFeatures, ReferenceIdentity, set]] = {}
    for spec in active:
        for ident in spec.features.identities:
            slot = needed.setdefault((id(spec.features.refnet), id(ident)), (spec.features, ident, set()))
            slot[2].update(spec.needs())
    fetched = {slot: identity_features(base_model, feats, ident, timestep, keys, device, dtype)
               for slot, (feats, ident, keys) in needed.items()}

    latent_hw = (x.shape[-2], x.shape[-1])
    states = {}
    for spec in active:
        refs = [{k: _as_tokens(fetched[(id(spec.features.refnet), id(ident))][k]) for k in spec.needs()}
                for ident in spec.features.identities]
        per_item = None
        if spec.routing.mode == MODE_PER_ITEM:
            per_item = row_items(cond_or_uncond, x.shape[0]) % spec.features.count
        strength = strengths[id(spec)]
        states[id(spec)] = SpecCall(spec, strength.to(device, non_blocking=True), refs, latent_hw, strength, per_item,
                                    [log_runs(ident) for ident in spec.features.identities])
    return CallState(states, base_model.diffusion_model)


# --- the wrapper -----------------------------------------------------------------------------

def position_channel(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """FlashFace's fifth input channel [B, 1, h, w]: the face-position mask subsampled to the
    latent as the official code does (``mask[::8, ::8]`` of the pixel-size mask: nearest, no
    averaging, so a box edge inside an 8-pixel cell rounds as the official one does), zeros
    when there is none (no constraint)."""
    b, _, h, w = x.shape
    if mask is None:
        return torch.zeros((b, 1, h, w), device=x.device, dtype=x.dtype)
    m = ((mask if mask.ndim == 3 else mask.unsqueeze(0)) > 0.5).float()
    hm, wm = m.shape[-2:]
    if abs(hm / wm - h / w) > 0.02 * (h / w):
        raise ValueError(f"{REFERENCE_NODE}: 'position_mask' is {wm}×{hm} (w×h) but the image being generated is "
                         f"{w * 8}×{h * 8}; make the face position mask at the image size (or the same aspect ratio)")
    if (hm, wm) != (h, w):
        m = torch.nn.functional.interpolate(m.unsqueeze(1), size=(h, w), mode="nearest").squeeze(1)
    if m.shape[0] not in (1, b):
        m = m[:1]
    return m.unsqueeze(1).expand(b, -1, -1, -1).to(device=x.device, dtype=x.dtype, non_blocking=True)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """``WrappersMP.APPLY_MODEL`` wrapper installed by every IDFusion patch (key "idfusion")."""
    base_model = executor.class_obj
    unet = base_model.diffusion_model
    if c_concat is None and getattr(unet, "in_channels", x.shape[1]) == x.shape[1] + 1:
        c_concat = position_channel(transformer_options.get(POSITION), x)
    plan = transformer_options.get(PLAN)
    if plan is not None and plan.specs:
        state = prepare_call(base_model, plan, x, t, transformer_options)
        transformer_options = {**transformer_options, CALL: state}
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
