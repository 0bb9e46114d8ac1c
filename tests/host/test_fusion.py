"""Fused keys/values and identity routing against the real host (tiny SD1.5-layout UNet)."""
import pytest
import torch

from idf_testlib import engine as E
from idf_testlib.engine import AttentionRecorder, halves, id_masks

ALL = "all (input + middle + output)"
TRAINING_FREE = "training-free (self-attention projections)"
MIX, REGION = "mix (weights)", "by region (identity masks)"


def fused(model, features, weight=1.0, mode=MIX, outside="all", masks=None, blocks=ALL):
    from IDFusion.nodes.fusion import FusedKV
    return FusedKV.execute(model, features, weight, 0.0, 1.0, blocks, TRAINING_FREE, mode, outside,
                           identity_masks=masks).result[0]


def reference(model, features, mode=MIX, outside="all", masks=None, blocks="decoder (middle + output)"):
    from IDFusion.nodes.reference import ReferenceAttention
    return ReferenceAttention.execute(model, features, 0.9, 0.0, 1.0, blocks, mode, outside,
                                      identity_masks=masks).result[0]


def test_weight_zero_equals_the_original_model(sd15):
    features = E.training_free_features(sd15, E.identity(1, count=3))
    assert torch.equal(E.sample(fused(sd15, features, weight=0.0)), E.sample(sd15))


def test_fused_kv_changes_the_result_and_keeps_the_original(sd15):
    features = E.training_free_features(sd15, E.identity(1, count=3))
    before = E.sample(sd15)
    out = E.sample(fused(sd15, features))
    assert not torch.allclose(out, before)
    assert torch.equal(E.sample(sd15), before)


@pytest.mark.parametrize("patcher", [fused, reference])
def test_one_identity_with_a_full_mask_equals_the_unmasked_path(sd15, patcher):
    features = E.training_free_features(sd15, E.identity(1, count=2))
    full = id_masks(torch.ones(1, 128, 128))
    masked = patcher(sd15, features, mode=REGION, masks=full)
    assert torch.equal(E.sample(masked), E.sample(patcher(sd15, features)))


def test_one_reference_pass_serves_fused_kv_and_reference_attention(sd15):
    """Both patches on one MODEL read the same per-step pass (features for the union of blocks)."""
    features = E.training_free_features(sd15, E.identity(1))
    both = reference(fused(sd15, features), features)
    E.sample(both, steps=2)
    from IDFusion.models.feature_cache import FEATURE_CACHE
    assert FEATURE_CACHE.stats()["reference_passes"] == 2


@pytest.mark.parametrize("latent_hw", [(16, 16), (9, 13)])
def test_isolation_region_j_never_attends_to_identity_i(sd15, latent_hw):
    """Measured on the real blocks: the probability from a query in region j to any key of
    identity i ≠ j is exactly 0, at every layer resolution, odd latent sizes included."""
    from IDFusion.attention.routing import fit_to_latent, query_weights
    h, w = latent_hw
    a, b = E.identity(1, count=1), E.identity(2, count=2)
    masks = halves(h * 8, w * 8)
    patched = fused(sd15, E.training_free_features(sd15, a, b), mode=REGION, outside="none", masks=id_masks(masks))
    with AttentionRecorder().installed() as recorder:
        E.sample(patched, steps=1, size=None, latent_hw=latent_hw)
    assert recorder.calls, "the fused-KV patch never reached the host attention"
    latent_masks = fit_to_latent(masks, h, w)
    ref_tokens = {}
    for ident_index, ident in enumerate((a, b)):
        ref_tokens[ident_index] = ident.count
    seen_layers = set()
    for block, _, lq, probs in recorder.calls:
        alpha = query_weights(latent_masks, lq, (h, w), torch.ones(2) / 2, "none")[0]        # [L, 2]
        per_ref = (probs.shape[-1] - 77) // (ref_tokens[0] + ref_tokens[1])
        span0 = slice(77, 77 + ref_tokens[0] * per_ref)
        span1 = slice(77 + ref_tokens[0] * per_ref, None)
        in0, in1 = alpha[:, 0] == 1, alpha[:, 1] == 1
        assert bool(in0.any()) and bool(in1.any())
        assert torch.count_nonzero(probs[..., in0, span1]) == 0
        assert torch.count_nonzero(probs[..., in1, span0]) == 0
        assert bool((probs[..., in0, span0].sum(-1) > 0).all()) and bool((probs[..., in1, span1].sum(-1) > 0).all())
        seen_layers.add(lq)
    assert len(seen_layers) == 4            # all four resolutions of the UNet were checked


def test_reference_attention_region_j_is_independent_of_identity_i(sd15):
    """At the first patched block, changing identity 2's references leaves region 1 bit-identical."""
    a, b, b2 = E.identity(1, count=1), E.identity(2, count=2), E.identity(3, count=2)
    masks = id_masks(halves(128, 128))
    outputs = []
    for second in (b, b2):
        patched = reference(sd15, E.training_free_features(sd15, a, second), mode=REGION, outside="none", masks=masks)
        captured = {}

        def capture(n, extra, captured=captured):
            key = (extra["block"][0], extra["block"][1], extra.get("block_index", 0))
            captured.setdefault(key, n.clone())
            return n
        patched.set_model_attn1_output_patch(capture)
        E.sample(patched, steps=1)
        outputs.append(captured[("middle", 0, 0)])          # the first block the decoder selection patches
    first, second = outputs
    left = torch.zeros(2, 2, dtype=torch.bool)               # middle block: 2×2 tokens for a 16×16 latent
    left[:, 0] = True
    left = left.flatten()
    assert torch.equal(first[:, left], second[:, left])
    assert not torch.equal(first[:, ~left], second[:, ~left])


def test_outside_all_mixes_and_none_ignores_identities(sd15):
    from IDFusion.models.engine import MODE_REGION, Routing, SpecCall, Spec
    from IDFusion.models.patches import spec_alpha
    features = E.training_free_features(sd15, E.identity(1), E.identity(2), weights=[3.0, 1.0])
    masks = torch.zeros(2, 128, 128)
    masks[0, :, :32] = 1
    masks[1, :, 96:] = 1
    for outside, expected in (("all", [0.75, 0.25]), ("none", [0.0, 0.0])):
        spec = Spec("reference", features, (), "attn1", 1.0, routing=Routing(MODE_REGION, masks, outside))
        call = SpecCall(spec, torch.ones(1), [], (16, 16), torch.ones(1))
        alpha = spec_alpha(call, 256, torch.device("cpu"))[0].view(16, 16, 2)
        assert alpha[0, 8].tolist() == expected
        assert alpha[0, 0].tolist() == [1.0, 0.0] and alpha[0, 15].tolist() == [0.0, 1.0]


def test_bad_masks_are_clear_errors(sd15):
    features = E.training_free_features(sd15, E.identity(1), E.identity(2))
    three = id_masks(torch.ones(3, 64, 64))
    with pytest.raises(ValueError, match="3 region.*2 identities"):
        fused(sd15, features, mode=REGION, masks=three)
    with pytest.raises(ValueError, match="identity_masks.*identity_mode"):
        fused(sd15, features, mode=MIX, masks=id_masks(halves(64, 64)))
    tall = fused(sd15, features, mode=REGION, masks=id_masks(halves(256, 64)))
    with pytest.raises(ValueError, match=r"^IDFusion Fused KV: 'identity_masks' is 64×256 \(w×h\) but the image "
                                         r"being generated is 128×128; set the width and height of 'IDFusion Multi-ID "
                                         r"Masks' to the image size"):
        E.sample(tall, steps=1)


def test_under_the_guider_fused_kv_joins_only_the_reference_branch(sd15):
    """Three-way guidance: the text and none branches see no faces, the text+ref branch does."""
    from IDFusion.models.engine import GUIDANCE, Guidance
    features = E.training_free_features(sd15, E.identity(1))
    patched = fused(sd15, features)
    patched.model_options["transformer_options"][GUIDANCE] = Guidance(ref_conds=frozenset({0}))
    positive, negative = E.conditioning(5), E.conditioning(6)
    guider = E.plain_guider(patched, positive, negative, cfg=3.0)
    with AttentionRecorder().installed() as recorder:
        E.denoised_once(guider)
    assert recorder.calls
    for _, conds, _, probs in recorder.calls:                 # one row per cond, in cond_or_uncond order
        assert sorted(conds) == [0, 1] and probs.shape[0] == 2
        ref, other = conds.index(0), conds.index(1)
        assert torch.count_nonzero(probs[other, ..., 77:]) == 0
        assert bool((probs[ref, ..., 77:].sum(-1) > 0).all())
