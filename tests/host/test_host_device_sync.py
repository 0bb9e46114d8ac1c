"""No host-device synchronisation in a patched UNet call, checked without a GPU.

A GPU synchronises whenever the host reads a device tensor's values (``bool()``, ``.item()``,
``.tolist()``, ``.nonzero()``, a copy to the CPU). The ``meta`` device has shapes and no values:
every such read raises there. So the real patched MODEL (ComfyUI's ``apply_model``, IDFusion's
wrapper, engine and attention patches, ComfyUI's UNet) is run with its weights and inputs on
``meta``, with host-side data (strengths, cond indices, routing masks) on the CPU as in a GPU
run: if it completes, nothing in the call read a device value back.

Two reads are allowed and stood in for, both on the CPU model first: ``engine.step_values``,
the one read per UNet call (sigma and timestep: the feature cache needs the timestep on the
host), and ``engine.weights_fingerprint``, computed once per model (memoised) — the meta copy
holds the same weights as the CPU model. The reference features come from the cache (filled by
the CPU call), as in every call after a step's first. On a GPU the same is checked by
``torch.cuda.set_sync_debug_mode`` (tools/benchmark.py --device cuda reports it).
"""
import copy
from types import SimpleNamespace

import pytest
import torch

from idf_testlib import engine as E
from idf_testlib import flashface_fixtures as fx
from idf_testlib import models

AUTO_BLOCKS = "auto (FlashFace: decoder)"
ALL_BLOCKS = "all (input + middle + output)"
REGION = "by region (identity masks)"
MIX = "mix (weights)"
ROWS = [0, 1, 2]                 # three guidance branches: text+ref, text, none
LATENT = 16


def meta_attention(func, *args, **kwargs):
    """The host's torch attention for every block (ComfyUI's CPU default, sub-quadratic attention,
    asks the device for free memory, which meta cannot answer)."""
    from comfy.ldm.modules.attention import attention_pytorch
    return attention_pytorch(*args, **kwargs)


def call(base_model, patcher, x, sigma, context, guidance=None):
    """One apply_model call as calc_cond_batch makes it (rows cond-major, the MODEL's wrappers)."""
    import comfy.model_patcher
    import comfy.sampler_helpers
    from IDFusion.models.engine import GUIDANCE
    options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    comfy.sampler_helpers.prepare_model_patcher(patcher, {}, options)
    to = dict(options["transformer_options"])
    to.update(cond_or_uncond=list(ROWS), uuids=[None] * len(ROWS), sigmas=sigma,
              optimized_attention_override=meta_attention)
    if guidance is not None:
        to[GUIDANCE] = guidance
    return base_model.apply_model(x, sigma, c_crossattn=context, transformer_options=to)


def meta_copy(base_model):
    """The BaseModel with copies of its modules on meta (the model config is shared: newer hosts'
    configs cannot be deep-copied), the original untouched."""
    meta = object.__new__(type(base_model))
    meta.__dict__ = dict(base_model.__dict__)
    meta._modules = {name: copy.deepcopy(module).to("meta") for name, module in base_model._modules.items()}
    meta._parameters = {name: torch.nn.Parameter(p.to("meta"), p.requires_grad)
                        for name, p in base_model._parameters.items()}
    meta._buffers = {name: b.to("meta") for name, b in base_model._buffers.items()}
    return meta


def run_on_meta(patcher, monkeypatch, guidance=None, meta_patcher=None) -> None:
    """The patched call on the CPU (fills the cache), then on meta (``meta_patcher``: the same
    plan with the pack's own weights on meta; default ``patcher``)."""
    from IDFusion.models import engine
    x = torch.randn(len(ROWS), 4, LATENT, LATENT, generator=E.gen(1)) * 3
    sigma = torch.full((len(ROWS),), 3.0)
    context = torch.cat([E.context(5), E.context(5), E.context(6)])
    cpu_out = call(patcher.model, patcher, x, sigma, context, guidance)
    assert torch.isfinite(cpu_out).all()

    on_host = engine.step_values(patcher.model, sigma)
    fingerprint = engine.weights_fingerprint
    monkeypatch.setattr(engine, "step_values", lambda base_model, s: on_host)
    monkeypatch.setattr(engine, "weights_fingerprint", lambda base_model, source: fingerprint(patcher.model, source))
    meta_model = meta_copy(patcher.model)
    passes = engine.FEATURE_CACHE.stats()["reference_passes"]
    out = call(meta_model, meta_patcher or patcher, x.to("meta"), sigma.to("meta"), context.to("meta"), guidance)
    assert out.device.type == "meta" and out.shape == cpu_out.shape
    assert engine.FEATURE_CACHE.stats()["reference_passes"] == passes          # served from the cache


def test_meta_detects_a_device_read(host):
    """The detector works: the reads the patches used to make raise on meta."""
    from IDFusion.attention.reference import reference_attention, rows_used
    weights = torch.full((3, 1, 1), 0.85, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool((weights != 0).any())
    with pytest.raises((RuntimeError, NotImplementedError)):
        rows_used(weights)
    q = torch.empty(3, 8, 8, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        reference_attention(q, q, q, [(q, q)], weights, 2, meta_attention)             # no host-side 'used'


def test_training_free_reference_attention_and_fused_kv_with_routing_read_nothing(sd15, monkeypatch):
    """Two identities routed by region in reference attention (every block) and fused KV, the
    reference given to one guidance branch, counted references."""
    from IDFusion.models.engine import Guidance
    from IDFusion.models.masks import IdentityMasks
    from IDFusion.models.references import ReferenceIdentity
    from IDFusion.nodes.fusion import FusedKV
    from IDFusion.nodes.reference import ReferenceAttention
    a = E.identity(1, count=3)
    a = ReferenceIdentity(a.label, a.latents, a.context, counts=(2, 1, 1))
    features = E.training_free_features(sd15, a, E.identity(2, count=2))
    masks = torch.zeros(2, LATENT * 8, LATENT * 8)
    masks[0, :, :64], masks[1, :, 64:] = 1, 1
    identity_masks = IdentityMasks(masks, ("a", "b"))
    m = ReferenceAttention.execute(sd15, features, 0.85, 0.0, 1.0, ALL_BLOCKS, REGION, "none",
                                   identity_masks=identity_masks).result[0]
    m = FusedKV.execute(m, features, 0.8, 0.0, 1.0, ALL_BLOCKS, "training-free (self-attention projections)", REGION,
                        "all", identity_masks=identity_masks).result[0]
    run_on_meta(m, monkeypatch, Guidance(ref_conds=frozenset({0})))


def test_per_batch_item_and_mixed_identities_read_nothing(sd15, monkeypatch):
    from IDFusion.nodes.reference import ReferenceAttention
    features = E.training_free_features(sd15, E.identity(1), E.identity(2), weights=[0.7, 0.3])
    for mode in (MIX, "per batch item"):
        m = ReferenceAttention.execute(sd15, features, 0.85, 0.0, 1.0, AUTO_BLOCKS, mode, "all").result[0]
        run_on_meta(m, monkeypatch)


def test_flashface_extra_attention_with_counted_references_reads_nothing(host, monkeypatch):
    """FlashFace's A′ (its weights on meta too), one reference counted four times, a position mask."""
    from IDFusion.models.engine import Guidance
    from IDFusion.models.patches import FlashFaceAttention
    from IDFusion.models.references import FlashFaceModules, ReferenceFeatures, ReferenceIdentity
    from IDFusion.nodes.loaders import ReferenceNetLoader
    from IDFusion.nodes.reference import ReferenceAttention, find_flashface_patch, replace_flashface_patch
    checkpoint = fx.write_tiny_checkpoints()["safetensors"].name
    model, refnet = ReferenceNetLoader.execute(models.tiny_sd15(), checkpoint).result
    ident = ReferenceIdentity("face", torch.randn(1, 4, 8, 8, generator=E.gen(3)), E.context(4), counts=(4,))
    mask = torch.zeros(LATENT * 8, LATENT * 8)
    mask[20:70, 30:80] = 1
    m = ReferenceAttention.execute(model, ReferenceFeatures(refnet, (ident,), (1.0,)), 1.2, 0.0, 1.0, AUTO_BLOCKS, MIX,
                                   "all", position_mask=mask).result[0]
    patch = find_flashface_patch(m)
    holder = copy.deepcopy(patch.modules.module).to("meta")
    meta_patch = FlashFaceAttention(FlashFaceModules(SimpleNamespace(model=holder), patch.modules.source),
                                    tuple(patch.blocks), patch.specs)
    on_meta = m.clone()
    replace_flashface_patch(on_meta, patch, meta_patch)      # the patch is shared by clones: swap it on one
    run_on_meta(m, monkeypatch, Guidance(ref_conds=frozenset({0})), on_meta)
