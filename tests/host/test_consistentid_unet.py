"""ConsistentID on the real host's UNet: strength 0 is the plain model, several people are kept apart
by region (measured on the attention probabilities, as for fused KV), identities mix by weight,
the patch composes with fused KV and reference attention on one MODEL, and the merge switches
prompts at the right step."""
import pytest
import torch

from idf_testlib import consistentid_fixtures as cf
from idf_testlib import engine as E
from idf_testlib.engine import AttentionRecorder, halves, id_masks

MIX, PER_ITEM, REGION = "mix (weights)", "per batch item", "by region (identity masks)"


def apply(model, weights, faces, id_strength=1.0, lora_strength=1.0, mode=MIX, outside="all", masks=None):
    from IDFusion.nodes.consistentid import ConsistentIDApply
    return ConsistentIDApply.execute(model, weights, faces, id_strength, lora_strength, mode, outside,
                                     identity_masks=masks).result[0]


def people(weights, *seeds, mix=None):
    from IDFusion.models.consistentid.face import ConsistentIDFaces
    faces = tuple(cf.random_face(weights, s) for s in seeds)
    return ConsistentIDFaces(weights, faces, tuple(mix or [1.0] * len(faces)))


def test_strength_zero_equals_the_plain_model(cid_model, cid_weights):
    from IDFusion.models.consistentid.patch import IDTokenAttention
    from IDFusion.nodes.unet_blocks import attn2_replace, block_table
    faces = people(cid_weights, 1)
    plain = E.sample(cid_model)
    zero = apply(cid_model, cid_weights, faces, 0.0, 0.0)
    assert all(isinstance(attn2_replace(zero, key), IDTokenAttention) for key in block_table(zero))
    assert torch.equal(E.sample(zero), plain)
    id_only = E.sample(apply(cid_model, cid_weights, faces, 1.0, 0.0))
    lora_only = E.sample(apply(cid_model, cid_weights, faces, 0.0, 1.0))
    both = E.sample(apply(cid_model, cid_weights, faces))
    for changed in (id_only, lora_only, both):
        assert not torch.allclose(changed, plain)
    assert not torch.allclose(id_only, both) and not torch.allclose(lora_only, both)
    assert torch.equal(E.sample(cid_model), plain)                  # the input MODEL is untouched


def test_the_patch_holds_no_module_of_the_model(cid_model, cid_weights):
    from IDFusion.nodes.unet_blocks import attn2_replace
    patched = apply(cid_model, cid_weights, people(cid_weights, 1))
    patch = attn2_replace(patched, ("middle", 0, 0))
    assert patch.models() == [cid_weights.adapter]
    host_modules = {id(m) for m in cid_model.model.modules()}
    spec = patch.specs[0]
    reachable = [v for v in (*vars(patch).values(), *vars(spec).values()) if isinstance(v, torch.nn.Module)]
    reachable += list(cid_weights.adapter.model.modules())
    assert not [m for m in reachable if id(m) in host_modules]


@pytest.mark.parametrize("latent_hw", [(16, 16), (9, 13)])
def test_region_j_never_attends_to_person_i(cid_model, cid_weights, latent_hw):
    """Measured on the real blocks: a query in region j gives exactly zero probability to every ID
    token of person i != j, at every layer resolution, odd latent sizes included."""
    from IDFusion.attention.routing import fit_to_latent, query_weights
    h, w = latent_hw
    masks = halves(h * 8, w * 8)
    patched = apply(cid_model, cid_weights, people(cid_weights, 1, 2), mode=REGION, outside="none",
                    masks=id_masks(masks))
    with AttentionRecorder().installed() as recorder:
        E.sample(patched, steps=1, size=None, latent_hw=latent_hw)
    calls = [c for c in recorder.calls if c[3].shape[-1] == 8]                # the ID-token attentions: 2 × 4 keys
    assert calls, "the ID-token attention never reached the host attention"
    latent_masks = fit_to_latent(masks, h, w)
    layers = set()
    for _, _, lq, probs in calls:
        alpha = query_weights(latent_masks, lq, (h, w), torch.ones(2) / 2, "none")[0]
        in0, in1 = alpha[:, 0] == 1, alpha[:, 1] == 1
        assert bool(in0.any()) and bool(in1.any())
        assert torch.count_nonzero(probs[..., in0, 4:]) == 0 and torch.count_nonzero(probs[..., in1, :4]) == 0
        assert bool((probs[..., in0, :4].sum(-1) > 0.999).all()) and bool((probs[..., in1, 4:].sum(-1) > 0.999).all())
        layers.add(lq)
    assert len(layers) == 4


def test_cleanup_after_sampling_drops_the_routing_weights(cid_model, cid_weights):
    import comfy.sample
    patched = apply(cid_model, cid_weights, people(cid_weights, 1, 2), mode=REGION, masks=id_masks(halves(128, 128)))
    spec = spec_of(patched)
    during = []
    noise = torch.randn(1, 4, 16, 16, generator=E.gen(0))
    comfy.sample.sample(patched, noise, 2, 5.0, "euler", "normal", E.conditioning(5), E.conditioning(6),
                        torch.zeros_like(noise), disable_pbar=True, seed=0,
                        callback=lambda *_: during.append(len(spec._alpha)))
    assert during and all(during) and spec._alpha == {}


def id_call(spec, q, rows_cond, latent_hw=(8, 8)):
    from IDFusion.models.consistentid.patch import id_token_attention
    extra = {"n_heads": 8, "cond_or_uncond": rows_cond, "original_shape": [len(rows_cond), 4, *latent_hw]}
    index = next(iter(spec.layers.values()))
    return id_token_attention(spec, index, q, extra)


def spec_of(patched):
    from IDFusion.nodes.unet_blocks import attn2_replace
    return attn2_replace(patched, ("input", 1, 0)).specs[0]


def test_outside_none_gives_no_id_tokens_and_all_mixes(cid_model, cid_weights):
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :16] = 1
    masks[1, :, 48:] = 1
    q = torch.randn(2, 64, 32, generator=E.gen(4))
    for outside in ("none", "all"):
        spec = spec_of(apply(cid_model, cid_weights, people(cid_weights, 1, 2), mode=REGION, outside=outside,
                             masks=id_masks(masks)))
        out = id_call(spec, q, [0, 1]).view(2, 8, 8, 32)
        middle = out[:, :, 3:5]                                              # columns outside both regions
        if outside == "none":
            assert torch.count_nonzero(middle) == 0 and torch.count_nonzero(out[:, :, :2]) > 0
        else:
            assert bool((middle.abs().sum(-1) > 0).all())


def test_one_person_with_a_full_mask_equals_the_unmasked_path(cid_model, cid_weights):
    faces = people(cid_weights, 1)
    full = apply(cid_model, cid_weights, faces, mode=REGION, masks=id_masks(torch.ones(1, 128, 128)))
    assert torch.equal(E.sample(full), E.sample(apply(cid_model, cid_weights, faces)))


def test_per_batch_item_gives_each_row_its_person(cid_model, cid_weights):
    spec_both = spec_of(apply(cid_model, cid_weights, people(cid_weights, 1, 2), mode=PER_ITEM))
    q = torch.randn(4, 64, 32, generator=E.gen(5))                            # cond rows 0, 1; uncond rows 2, 3
    out = id_call(spec_both, q, [0, 1])
    for item, seed in enumerate((1, 2)):
        alone = id_call(spec_of(apply(cid_model, cid_weights, people(cid_weights, seed))), q, [0, 1])
        for row in (item, 2 + item):
            assert torch.allclose(out[row], alone[row], atol=1e-5), (item, row, (out[row] - alone[row]).abs().max())


def test_mixing_blends_arcface_and_clip_states_by_weight(cid_model, cid_weights):
    from IDFusion.models.consistentid.unet import faces_tokens
    modules = cid_weights.loaded_encoders()
    a, b = cf.random_face(cid_weights, 1), cf.random_face(cid_weights, 2)
    from IDFusion.models.consistentid.face import ConsistentIDFaces
    for weights in ((1.0, 0.0), (0.25, 0.75)):
        mixed = faces_tokens(ConsistentIDFaces(cid_weights, (a, b), weights), mixed=True)
        w = torch.tensor(weights) / sum(weights)
        expected = modules.image_proj((w[0] * a.arcface + w[1] * b.arcface)[None],
                                      (w[0] * a.clip_states + w[1] * b.clip_states)[None])
        assert mixed.shape == (1, 4, 64) and torch.allclose(mixed, expected, atol=1e-6)
    separate = faces_tokens(ConsistentIDFaces(cid_weights, (a, b), (1.0, 1.0)), mixed=False)
    assert torch.equal(separate, torch.stack([a.id_tokens, b.id_tokens]))


# --- on one MODEL with fused KV and reference attention ------------------------------------------------------

def fused(model, features, weight=1.0):
    from IDFusion.nodes.fusion import FusedKV
    return FusedKV.execute(model, features, weight, 0.0, 1.0, "all (input + middle + output)",
                           "training-free (self-attention projections)", MIX, "all").result[0]


def reference(model, features):
    from IDFusion.nodes.reference import ReferenceAttention
    return ReferenceAttention.execute(model, features, 0.9, 0.0, 1.0, "decoder (middle + output)", MIX,
                                      "all").result[0]


def test_composes_with_fused_kv_in_either_order(cid_model, cid_weights):
    from IDFusion.models.consistentid.patch import IDTokenAttention
    from IDFusion.models.patches import FusedKV
    from IDFusion.nodes.unet_blocks import attn2_replace
    features = E.training_free_features(cid_model, E.identity(1, count=2))
    faces = people(cid_weights, 1)
    first = fused(apply(cid_model, cid_weights, faces), features)
    second = apply(fused(cid_model, features), cid_weights, faces)
    for patched in (first, second):
        patch = attn2_replace(patched, ("middle", 0, 0))
        assert isinstance(patch, IDTokenAttention) and isinstance(patch.inner, FusedKV)
        assert cid_weights.adapter in patch.models()
    assert torch.equal(E.sample(first), E.sample(second))
    only_fused = E.sample(fused(cid_model, features))
    assert torch.equal(E.sample(apply(fused(cid_model, features), cid_weights, faces, 0.0, 0.0)), only_fused)
    assert not torch.allclose(E.sample(first), only_fused)


def test_with_reference_attention_and_fused_kv_one_pass_per_step(cid_model, cid_weights):
    from IDFusion.models.feature_cache import FEATURE_CACHE
    features = E.training_free_features(cid_model, E.identity(2))
    everything = reference(fused(apply(cid_model, cid_weights, people(cid_weights, 1)), features), features)
    out = E.sample(everything, steps=2)
    assert FEATURE_CACHE.stats()["reference_passes"] == 2
    assert not torch.allclose(out, E.sample(reference(fused(cid_model, features), features), steps=2))


# --- the merge step ------------------------------------------------------------------------------------------

def merge_conditioning(clip, weights, merge_at=0.6):
    from IDFusion.nodes.consistentid import ConsistentIDConditioning
    positive, negative, _ = ConsistentIDConditioning.execute(clip, weights, people(weights, 1), "a photo of a man",
                                                             "blurry", merge_at, 1).result
    return positive, negative


def prompts_per_step(model, positive, negative, steps, scheduler):
    """Which positive prompt ("text" or "facial") each sampling step ran with, from the UNet's inputs."""
    import comfy.sample
    import comfy.samplers
    text_only, facial = positive[0][0], positive[1][0]
    sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, scheduler, steps)
    used = {}

    def wrapper(apply_model, args):
        rows = args["c"]["c_crossattn"]
        per = rows.shape[0] // len(args["cond_or_uncond"])
        step = int(torch.argmin((sigmas[:-1] - float(args["timestep"][0])).abs()))
        for i, c in enumerate(args["cond_or_uncond"]):
            if c == 0:
                row = rows[i * per]
                kind = "text" if torch.equal(row, text_only[0]) else "facial" if torch.equal(row, facial[0]) else "?"
                used.setdefault(step, set()).add(kind)
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=E.gen(0))
    comfy.sample.sample(m, noise, steps, 5.0, "euler", scheduler, positive, negative, latent, disable_pbar=True, seed=0)
    return [sorted(used[i]) for i in range(steps)]


@pytest.mark.parametrize("steps,scheduler,merge_at,last_text", [(50, "normal", 0.6, 30), (20, "karras", 0.6, 12),
                                                                (10, "normal", 0.0, 0)])
def test_the_merge_switches_at_the_step(cid_model, cid_clip, cid_weights, steps, scheduler, merge_at, last_text):
    positive, negative = merge_conditioning(cid_clip, cid_weights, merge_at)
    patched = apply(cid_model, cid_weights, people(cid_weights, 1))
    used = prompts_per_step(patched, positive, negative, steps, scheduler)
    assert used == [["text"]] * (last_text + 1) + [["facial"]] * (steps - last_text - 1)


def test_without_the_apply_node_the_prompts_still_switch_once(cid_model, cid_clip, cid_weights):
    positive, negative = merge_conditioning(cid_clip, cid_weights)
    used = prompts_per_step(cid_model, positive, negative, 50, "normal")
    assert all(len(u) == 1 for u in used)
    switch = used.index(["facial"])
    assert used == [["text"]] * switch + [["facial"]] * (50 - switch)
