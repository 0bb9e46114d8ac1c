"""The FlashFace engine against the real host (tiny SD1.5/SDXL-layout UNets in process):
block tables, training-free reference attention, identity mixing, the guider, the cache."""
import pytest
import torch

from idf_testlib import engine as E
from idf_testlib import models

AUTO = "auto (FlashFace: decoder)"
MIX = "mix (weights)"


def patch_reference(model, features, strength=0.85, blocks=AUTO, mode=MIX, outside="all", **kw):
    from IDFusion.nodes.reference import ReferenceAttention
    return ReferenceAttention.execute(model, features, strength, kw.pop("start", 0.0), kw.pop("end", 1.0), blocks,
                                      mode, outside, **kw).result[0]


def passes():
    from IDFusion.models.feature_cache import FEATURE_CACHE
    return FEATURE_CACHE.stats()["reference_passes"]


# --- block tables -----------------------------------------------------------------------------

@pytest.mark.parametrize("builder,table_name", [("tiny_sd15", "SD15_BLOCKS"), ("tiny_sdxl", "SDXL_BLOCKS")])
def test_block_table_hits_every_transformer_block_once(host, builder, table_name):
    """Every key of the table is called exactly once per forward, the middle block included."""
    from comfy.ldm.modules.attention import optimized_attention
    from IDFusion.nodes import unet_blocks

    model = getattr(models, builder)()
    table = getattr(unet_blocks, table_name)
    assert unet_blocks.block_table(model) == table
    assert any(k[0] == "middle" for k in table)
    hits = {}
    m = model.clone()
    for key in table:
        def counting(q, k, v, extra, key=key):
            hits[key] = hits.get(key, 0) + 1
            return optimized_attention(q, k, v, extra["n_heads"])
        unet_blocks.set_attn1_replace(m, counting, key)
        unet_blocks.set_attn2_replace(m, counting, key)
    base = m.model
    x = torch.randn(1, 4, 16, 16)
    kwargs = {}
    if base.adm_channels:
        kwargs["y"] = torch.randn(1, base.adm_channels)
    to = m.model_options["transformer_options"]
    base.apply_model(x, torch.tensor([1.0]), c_crossattn=E.context(1, models.SD15_TINY["context_dim"]),
                     transformer_options=to, **kwargs)
    assert hits == {k: 2 for k in table}


def test_selections_partition_the_table(host, sd15):
    from IDFusion.nodes import unet_blocks as U
    table = U.block_table(sd15)
    decoder = U.select_blocks(table, U.DECODER)
    assert decoder == tuple(k for k in table if k[0] in ("middle", "output"))
    assert set(U.select_blocks(table, U.ENCODER_DECODER)) == {k for k in table if k[0] != "middle"}
    assert U.select_blocks(table, U.ALL) == table


# --- training-free reference attention ------------------------------------------------------------

def test_strength_zero_equals_unpatched_exactly(sd15):
    features = E.training_free_features(sd15, E.identity(1))
    base = E.sample(sd15)
    for blocks in ("decoder (middle + output)", "all (input + middle + output)"):
        patched = patch_reference(sd15, features, strength=0.0, blocks=blocks)
        assert torch.equal(E.sample(patched), base)
    assert passes() == 0


def test_reference_changes_the_result_and_leaves_the_original_untouched(sd15):
    features = E.training_free_features(sd15, E.identity(1))
    before = E.sample(sd15)
    options_before = repr(sd15.model_options)
    patched = patch_reference(sd15, features, strength=0.9)
    out = E.sample(patched)
    assert not torch.allclose(out, before)
    assert torch.equal(E.sample(sd15), before)
    assert repr(sd15.model_options) == options_before
    assert "idfusion_plan" not in sd15.model_options.get("transformer_options", {})


def test_identity_weights_one_zero_equal_the_single_identity(sd15):
    a, b = E.identity(1, label="a"), E.identity(7, count=3, label="b")
    single = patch_reference(sd15, E.training_free_features(sd15, a))
    mixed = patch_reference(sd15, E.training_free_features(sd15, a, b, weights=[1.0, 0.0]))
    assert torch.equal(E.sample(mixed), E.sample(single))
    other = patch_reference(sd15, E.training_free_features(sd15, a, b, weights=[0.5, 0.5]))
    assert not torch.allclose(E.sample(other), E.sample(single))


def test_per_batch_item_identities_match_single_identity_runs(sd15):
    """Batch item i uses identity i: each item equals a run with that identity alone."""
    a, b = E.identity(1, label="a"), E.identity(7, label="b")
    both = patch_reference(sd15, E.training_free_features(sd15, a, b), mode="per batch item")
    out = E.sample(both, batch=2)
    for i, ident in enumerate((a, b)):
        alone = E.sample(patch_reference(sd15, E.training_free_features(sd15, ident)), batch=2)
        torch.testing.assert_close(out[i], alone[i], rtol=1e-5, atol=1e-5)


def test_schedule_outside_the_window_equals_unpatched(sd15):
    features = E.training_free_features(sd15, E.identity(1))
    never = patch_reference(sd15, features, strength=0.9, start=0.0, end=0.0)
    assert torch.equal(E.sample(never, steps=2), E.sample(sd15, steps=2))
    assert passes() == 0
    last_step = patch_reference(sd15, features, strength=0.9, start=0.99, end=1.0)   # only the final sigma
    assert not torch.equal(E.sample(last_step, steps=2), E.sample(sd15, steps=2))
    assert passes() == 1


# --- the cache ------------------------------------------------------------------------------------

def test_cache_hit_returns_identical_features_and_runs_no_pass(sd15):
    from IDFusion.models.engine import identity_features
    features = E.training_free_features(sd15, E.identity(1))
    patched = patch_reference(sd15, features, strength=0.9)
    first = E.sample(patched, steps=3)
    assert passes() == 3                       # one per step, shared by both CFG branches
    again = E.sample(patched, steps=3)
    assert passes() == 3 and torch.equal(first, again)

    ident = features.identities[0]
    needed = features_needed(patched)
    cached = identity_features(sd15.model, features, ident, 500.0, needed, torch.device("cpu"), torch.float32)
    from IDFusion.models.feature_cache import FEATURE_CACHE
    FEATURE_CACHE.clear()
    fresh = identity_features(sd15.model, features, ident, 500.0, needed, torch.device("cpu"), torch.float32)
    hit = identity_features(sd15.model, features, ident, 500.0, needed, torch.device("cpu"), torch.float32)
    assert cached.keys() == fresh.keys() == hit.keys() == needed
    assert all(torch.equal(fresh[k], hit[k]) and torch.equal(fresh[k], cached[k]) for k in needed)


def features_needed(patched):
    plan = patched.model_options["transformer_options"]["idfusion_plan"]
    return set().union(*(s.needs() for s in plan.specs))


def test_different_references_never_share_an_entry(sd15):
    a, b = E.identity(1), E.identity(2)
    E.sample(patch_reference(sd15, E.training_free_features(sd15, a)), steps=2)
    E.sample(patch_reference(sd15, E.training_free_features(sd15, b)), steps=2)
    assert passes() == 4


def test_a_lora_like_weight_patch_changes_the_weights_key(sd15):
    """The reference pass of a differently-patched UNet is not served from the cache."""
    features = E.training_free_features(sd15, E.identity(1))
    E.sample(patch_reference(sd15, features), steps=2)
    lora = sd15.clone()
    key = "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_k.weight"
    weight = lora.get_model_object(key)
    lora.add_patches({key: (torch.ones_like(weight) * 0.01,)}, 1.0)
    E.sample(patch_reference(lora, features), steps=2)
    assert passes() == 4


def test_disk_cache_skips_passes_after_the_memory_cache_is_gone(sd15, tmp_path):
    from IDFusion.models.feature_cache import FEATURE_CACHE, DiskCache
    from IDFusion.models.references import ReferenceIdentity
    ident = E.identity(1)
    disk = ReferenceIdentity(ident.label, ident.latents, ident.context, None, DiskCache(tmp_path))
    patched = patch_reference(sd15, E.training_free_features(sd15, disk), strength=0.9)
    first = E.sample(patched, steps=2)
    assert passes() == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2
    FEATURE_CACHE.clear()
    assert torch.equal(E.sample(patched, steps=2), first)
    assert passes() == 2 and FEATURE_CACHE.stats()["disk_hits"] == 2


def test_cache_budget_evicts_least_recently_used(host):
    from IDFusion.models.feature_cache import CacheKey, FeatureCache
    cache = FeatureCache(budget_bytes=3 * 400)
    entry = lambda: {(("output", 3, 0), "attn1"): torch.zeros(100)}      # 400 bytes
    keys = [CacheKey(str(i), "w", 1.0, "c") for i in range(4)]
    for k in keys[:3]:
        cache.put(k, entry())
    assert cache.get(keys[0], set(entry())) is not None                  # 0 is now most recent
    cache.put(keys[3], entry())
    assert cache.get(keys[1], set(entry())) is None
    assert all(cache.get(k, set(entry())) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.stats()["evictions"] == 1


# --- the guider -----------------------------------------------------------------------------------

def guider(model, positive, negative, **settings):
    from IDFusion.nodes.guidance import ReferenceGuider
    defaults = dict(text_scale=4.0, reference_scale=2.5, lambda_before=0.6, launch_timestep=1000, rescale=0.5)
    defaults.update(settings)
    return ReferenceGuider.execute(model, positive, negative, **defaults).result[0]


def test_guider_equals_the_formula_from_three_separate_calls(sd15):
    from IDFusion.attention.guidance import from_eps, rescale, three_way, to_eps
    positive, negative = E.conditioning(5), E.conditioning(6)
    patched = patch_reference(sd15, E.training_free_features(sd15, E.identity(1)), strength=0.9)
    got = E.denoised_once(guider(patched, positive, negative))

    text_ref = E.denoised_once(E.plain_guider(patched, positive))
    text = E.denoised_once(E.plain_guider(sd15, positive))
    none = E.denoised_once(E.plain_guider(sd15, negative))
    sigma = torch.tensor([E.SIGMA])
    x = E.noisy_input()
    eps = [to_eps(x, d, sigma) for d in (none, text, text_ref)]
    expected = from_eps(x, rescale(three_way(*eps, 4.0, 2.5), eps[1], 0.5), sigma)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_guider_before_launch_is_cfg_with_lambda_before_on_both_branches(sd15):
    from IDFusion.attention.guidance import from_eps, rescale, to_eps, two_way
    positive, negative = E.conditioning(5), E.conditioning(6)
    features = E.training_free_features(sd15, E.identity(1))
    got = E.denoised_once(guider(patch_reference(sd15, features, strength=0.9), positive, negative, launch_timestep=0))
    before = patch_reference(sd15, features, strength=0.6)
    text = E.denoised_once(E.plain_guider(before, positive))
    none = E.denoised_once(E.plain_guider(before, negative))
    sigma = torch.tensor([E.SIGMA])
    x = E.noisy_input()
    eps_text, eps_none = to_eps(x, text, sigma), to_eps(x, none, sigma)
    expected = from_eps(x, rescale(two_way(eps_none, eps_text, 4.0), eps_text, 0.5), sigma)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_guider_runs_one_reference_pass_per_step_for_three_branches(sd15):
    import comfy.samplers
    positive, negative = E.conditioning(5), E.conditioning(6)
    patched = patch_reference(sd15, E.training_free_features(sd15, E.identity(1)), strength=0.9)
    g = guider(patched, positive, negative)
    sigmas = patched.get_model_object("model_sampling").sigma_max * torch.tensor([1.0, 0.5, 0.2, 0.0])
    out = g.sample(torch.randn(1, 4, 16, 16, generator=E.gen(3)), torch.zeros(1, 4, 16, 16),
                   comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=3)
    assert torch.isfinite(out).all()
    assert passes() == 3


# --- errors ---------------------------------------------------------------------------------------

def test_region_mode_without_masks_and_count_mismatch_are_clear_errors(sd15):
    from IDFusion.models.masks import IdentityMasks
    features = E.training_free_features(sd15, E.identity(1), E.identity(2))
    with pytest.raises(ValueError, match="identity_masks.*not connected"):
        patch_reference(sd15, features, mode="by region (identity masks)")
    one = IdentityMasks(torch.ones(1, 128, 128), ("a",))
    with pytest.raises(ValueError, match="1 region.*2 identities"):
        patch_reference(sd15, features, mode="by region (identity masks)", identity_masks=one)


def test_position_mask_of_the_wrong_aspect_ratio_fails_naming_the_input(sd15):
    features = E.training_free_features(sd15, E.identity(1))
    mask = torch.zeros(128, 64)
    mask[10:40, 10:40] = 1
    patched = patch_reference(sd15, features, position_mask=mask)
    with pytest.raises(ValueError, match=r"^IDFusion Reference Attention: 'position_mask' is 64×128 \(w×h\)"):
        E.sample(patched, steps=1)
