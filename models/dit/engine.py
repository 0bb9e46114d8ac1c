"""Sampling-time engine of the DiT nodes: what a patched DiT needs at every model call.

A DiT node adds a spec to the MODEL clone's ``DitPlan`` (in ``transformer_options``):

- ``ReferenceSpec`` (*IDFusion DiT Reference Attention*): training-free reference attention —
  identities' reference keys/values from a reference pass, blended into chosen blocks with λ;
- ``PeopleSpec`` (*IDFusion DiT Identity References*): the call's native references
  (ReferenceLatent) grouped by person, each with a strength, optionally routed by region.

One APPLY_MODEL wrapper then, for each call: works out which specs act on which batch rows
(the same row rules as the UNet engine: ``models.engine``); gets every identity's reference
keys/values for this call — from the run store (timestep-zero references, kept on the device
for the whole run), from the content-addressed feature cache (memory, then disk), or from
one reference pass — and installs, for this call only, ``attention.RoutedAttention`` as the
host's ``optimized_attention_override`` (chained to any override already there). The
``LayoutRecorder`` attn1_patch tells it, block by block, where the text, the image and each
reference image's tokens are. An OUTER_SAMPLE wrapper scopes the run store to one sampling run.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..engine import GUIDANCE, MODE_PER_ITEM, Routing, SpecCall, _row_strength, row_conds, row_items, spec_active, \
    weights_fingerprint
from ..feature_cache import FEATURE_CACHE, CacheKey, Features
from ..references import ReferenceFeatures, ReferenceIdentity, ReferenceNet, Shared
from .families import Family, family_of, reference_method
from .reference_pass import FeatureKey, reference_pass

PLAN = "idfusion_dit_plan"
CALL = "idfusion_dit_call"
RUN = "idfusion_dit_run"
OVERRIDE = "optimized_attention_override"
#: What the training-free pass runs with; the weights fingerprint adds the model's own weights.
SOURCE = "dit-training-free"
#: What encodes DiT references, for the weights key: the sampled DiT itself (no weights of its own).
SELF_ENCODED = ReferenceNet(SOURCE, "the sampled DiT (training-free)")

BlockKey = tuple[str, int, int]


@dataclass(frozen=True, eq=False)
class ReferenceSpec(Shared):
    """Training-free reference attention: λ (``strength``) on ``blocks``; references at the current
    sigma (FlashFace) or at sigma 0 (``timestep_zero``: the same keys/values at every step)."""

    features: ReferenceFeatures
    blocks: frozenset
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    routing: Routing = field(default_factory=Routing)
    timestep_zero: bool = False
    kind: str = "reference"
    node: str = "IDFusionDiTReferenceAttention"    # named in errors found only at sampling time

    def needs(self) -> set[FeatureKey]:
        return {(b, kind) for b in self.blocks for kind in ("k", "v")}


@dataclass(frozen=True, eq=False)
class PeopleSpec(Shared):
    """Native references by person: ``shared`` references come first (everyone sees them), then
    ``counts[p]`` of person p, in order. ``strengths[p]`` is a log-bias on person p's keys;
    ``routing`` is MODE_REGION (masks, outside rule) or MODE_MIX (strengths only)."""

    node: str
    shared: int
    counts: tuple[int, ...]
    strengths: tuple[float, ...]
    routing: Routing
    blocks: frozenset
    _alpha: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)
class DitPlan(Shared):
    references: tuple[ReferenceSpec, ...] = ()
    people: PeopleSpec | None = None

    def with_reference(self, spec: ReferenceSpec) -> "DitPlan":
        return DitPlan(self.references + (spec,), self.people)

    def with_people(self, spec: PeopleSpec) -> "DitPlan":
        return DitPlan(self.references, spec)


class RunStore(Shared):
    """Device copies of timestep-zero reference features for one sampling run (not a dict: the
    host copies the dicts of ``transformer_options`` for every call)."""

    def __init__(self):
        self.features: dict[tuple, dict[FeatureKey, torch.Tensor]] = {}


@dataclass
class BlockLayout:
    """What the hooks say about one joint attention: its block, the text length and the token
    count of each native reference image (in the host's order)."""

    block: BlockKey
    txt: int
    ref_tokens: tuple[int, ...]


@dataclass
class PeopleCall:
    spec: PeopleSpec
    row_on: torch.Tensor                                         # [B] 1 where the rows get references
    latent_hw: tuple[int, int]
    log_weights: dict = field(default_factory=dict)              # layout → [B, Lq, P]


@dataclass
class DitCall:
    references: list[SpecCall]
    people: PeopleCall | None
    latent_hw: tuple[int, int]
    pending: BlockLayout | None = None

    def take(self, block: BlockKey) -> BlockLayout | None:
        """The layout the hook recorded for ``block``'s attention (once)."""
        layout, self.pending = self.pending, None
        return layout if layout is not None and layout.block == block else None


class LayoutRecorder(Shared):
    """attn1_patch: records each joint attention's token layout for ``RoutedAttention``; changes nothing."""

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None, **kwargs):
        call = (extra_options or {}).get(CALL)
        if call is not None:
            call.pending = BlockLayout((extra_options["block_type"], extra_options["block_index"], 0),
                                       int(extra_options["img_slice"][0]),
                                       tuple(int(n) for n in extra_options.get("reference_image_num_tokens") or ()))
        return {}


# --- reference features -----------------------------------------------------------------------

def _context_key(ident: ReferenceIdentity, family: Family, method: str, scale: float, guidance: float | None) -> str:
    text = f"{ident.context_digest}|{family.name}|{method}|{scale}|{guidance}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def identity_features(base_model, ident: ReferenceIdentity, sigma: float, guidance: float | None,
                      needed: set[FeatureKey], device, run: RunStore | None) -> dict[FeatureKey, torch.Tensor]:
    """One identity's reference keys/values at a pass sigma, on ``device`` in the compute dtype:
    run store (sigma 0), memory cache, disk cache, or a reference pass (counted)."""
    family = family_of(base_model)
    method, scale = reference_method(base_model.diffusion_model, family)
    timestep = float(base_model.model_sampling.timestep(torch.tensor([sigma])).float()[0])
    key = CacheKey(ident.digest, weights_fingerprint(base_model, SELF_ENCODED), round(timestep, 4),
                   _context_key(ident, family, method, scale, guidance))
    keep = run is not None and sigma == 0
    if keep and key in run.features and needed <= run.features[key].keys():
        return run.features[key]
    dtype = base_model.get_dtype_inference()

    def compute() -> Features:
        fresh = reference_pass(base_model, family, ident.latents, sigma, ident.context, ident.y, guidance, needed,
                               device)
        FEATURE_CACHE.count("reference_passes")
        return fresh

    entry, fresh = FEATURE_CACHE.lookup(key, needed, ident.disk_cache, compute)
    if fresh is not None:
        features = {k: fresh[k].to(dtype) for k in needed}
    else:
        features = {k: entry[k].to(device=device, dtype=dtype, non_blocking=True) for k in needed}
    if keep:
        run.features[key] = features
    return features


# --- one call ---------------------------------------------------------------------------------

def _guidance_value(kwargs: dict) -> float | None:
    g = kwargs.get("guidance")
    return None if g is None else float(torch.as_tensor(g).reshape(-1)[0])


def _reference_calls(base_model, specs, sig, conds, cond_or_uncond, rows, guidance, latent_hw, device, run, kwargs):
    strengths = {id(s): _row_strength(s, conds, guidance) for s in specs if spec_active(s, base_model, sig)}
    active = [s for s in specs if id(s) in strengths and bool((strengths[id(s)] != 0).any())]
    if not active:
        return []
    g = _guidance_value(kwargs)
    needed: dict[tuple[int, bool], tuple[ReferenceIdentity, set]] = {}
    for spec in active:
        for ident in spec.features.identities:
            needed.setdefault((id(ident), spec.timestep_zero), (ident, set()))[1].update(spec.needs())
    fetched = {slot: identity_features(base_model, ident, 0.0 if slot[1] else sig, g, keys, device, run)
               for slot, (ident, keys) in needed.items()}
    calls = []
    for spec in active:
        refs = [fetched[(id(ident), spec.timestep_zero)] for ident in spec.features.identities]
        per_item = None
        if spec.routing.mode == MODE_PER_ITEM:
            per_item = row_items(cond_or_uncond, rows) % spec.features.count
        strength = strengths[id(spec)]
        calls.append(SpecCall(spec, strength.to(device, non_blocking=True), refs, latent_hw, strength, per_item))
    return calls


def _rows_on(conds: torch.Tensor, guidance) -> torch.Tensor:
    """[B] 1 where the reference guider (if any) gives the row references, else 0."""
    if guidance is None or guidance.ref_conds is None:
        return torch.ones(len(conds))
    return torch.tensor([float(int(c) in guidance.ref_conds) for c in conds])


def _people_call(spec: PeopleSpec | None, ref_latents, conds, guidance, latent_hw, device) -> PeopleCall | None:
    if spec is None or not ref_latents:
        return None
    expected = spec.shared + sum(spec.counts)
    if len(ref_latents) != expected:
        raise ValueError(f"{spec.node}: the sampled conditioning carries {len(ref_latents)} reference latent(s), but "
                         f"{spec.shared} came before this node and it added {sum(spec.counts)}; connect this node's "
                         f"conditioning outputs to the sampler and chain other ReferenceLatent nodes before it")
    on = _rows_on(conds, guidance)
    if not bool(on.any()):
        return None
    return PeopleCall(spec, on.to(device), latent_hw)


def prepare_call(base_model, plan: DitPlan, x: torch.Tensor, sigma: torch.Tensor, transformer_options: dict,
                 kwargs: dict) -> DitCall | None:
    """Every active spec's state for this call (see the module docstring); None when none acts."""
    sig = float(sigma.reshape(-1)[0])
    cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
    conds = row_conds(cond_or_uncond, x.shape[0])
    guidance = transformer_options.get(GUIDANCE)
    latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
    references = _reference_calls(base_model, plan.references, sig, conds, cond_or_uncond, x.shape[0], guidance,
                                  latent_hw, x.device, transformer_options.get(RUN), kwargs)
    people = _people_call(plan.people, kwargs.get("ref_latents"), conds, guidance, latent_hw, x.device)
    if not references and people is None:
        return None
    return DitCall(references, people, latent_hw)


# --- wrappers ---------------------------------------------------------------------------------

def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                        **kwargs):
    """``WrappersMP.APPLY_MODEL`` wrapper of every DiT patch (key "idfusion_dit")."""
    from .attention import RoutedAttention

    plan = transformer_options.get(PLAN)
    call = prepare_call(executor.class_obj, plan, x, t, transformer_options, kwargs) if plan is not None else None
    if call is not None:
        transformer_options = {**transformer_options, CALL: call,
                               OVERRIDE: RoutedAttention(call, transformer_options.get(OVERRIDE))}
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def run_scope_wrapper(executor, *args, **kwargs):
    """``WrappersMP.OUTER_SAMPLE`` wrapper: a run store for the sampling run, dropped at its end."""
    options = executor.class_obj.model_options.setdefault("transformer_options", {})
    options[RUN] = RunStore()
    try:
        return executor(*args, **kwargs)
    finally:
        options.pop(RUN, None)
