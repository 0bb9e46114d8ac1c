"""Face Features with FlashFace weights as the official code runs them (in process): the encoded
negative prompt as the reference context (part of the cache key), four references by
counting, and the inputs' errors."""
import pytest
import torch

from idf_testlib import engine as E
from idf_testlib import flashface_fixtures as fx
from idf_testlib import models

AUTO_BLOCKS = "auto (FlashFace: decoder)"
MIX = "mix (weights)"
AUTO = "auto (FlashFace: negative prompt; training-free: empty prompt)"
NEGATIVE, EMPTY = "negative prompt", "empty prompt"
WIDTH = fx.TINY["context_dim"]
REF_PX = 64


@pytest.fixture(scope="module")
def flashface(host):
    from IDFusion.nodes.loaders import ReferenceNetLoader
    return tuple(ReferenceNetLoader.execute(models.tiny_sd15(), fx.write_tiny_checkpoints()["safetensors"].name).result)


@pytest.fixture(scope="module")
def vae(host):
    return models.tiny_vae()


def crops(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, REF_PX, REF_PX, 3, generator=E.gen(seed))


def features(refnet, vae, negative=None, n=2, context=AUTO, count=0, clip=None):
    from IDFusion.nodes.reference import FaceFeatures
    return FaceFeatures.execute(refnet, vae, REF_PX, False, context, count, clip=clip, negative=negative,
                                images=crops(n)).result[0]


def patched(model, feats, strength=0.85):
    from IDFusion.nodes.reference import ReferenceAttention
    return ReferenceAttention.execute(model, feats, strength, 0.0, 1.0, AUTO_BLOCKS, MIX, "all").result[0]


def passes() -> int:
    from IDFusion.models.feature_cache import FEATURE_CACHE
    return FEATURE_CACHE.stats()["reference_passes"]


# --- the reference context ----------------------------------------------------------------------

def test_the_reference_pass_runs_with_the_negative_prompt_and_it_keys_the_cache(flashface, vae):
    """Auto with FlashFace weights: the context is the negative CONDITIONING's tensor. The same
    negative (even re-encoded as a new tensor) hits the cache; another negative recomputes."""
    model, refnet = flashface
    negative_a = E.conditioning(11)
    feats = features(refnet, vae, negative_a)
    assert torch.equal(feats.identities[0].context, negative_a[0][0])
    first = E.sample(patched(model, feats), steps=2, negative=negative_a)
    assert passes() == 2
    same = [[negative_a[0][0].clone(), {}]]
    again = E.sample(patched(model, features(refnet, vae, same)), steps=2, negative=same)
    assert passes() == 2 and torch.equal(again, first)
    negative_b = E.conditioning(12)
    other = E.sample(patched(model, features(refnet, vae, negative_b)), steps=2, negative=negative_a)
    assert passes() == 4
    assert not torch.allclose(other, first)          # only the reference context differs


def test_the_empty_prompt_stays_an_option_and_ignores_the_negative(flashface, vae):
    """'empty prompt' needs the CLIP and keeps the features of any negative prompt."""
    from IDFusion.nodes.reference import FaceFeatures
    _, refnet = flashface
    with pytest.raises(ValueError, match=r"IDFusionFaceFeatures: reference_context is 'empty prompt' but 'clip' "
                                         r"is not connected; connect the checkpoint's CLIP"):
        features(refnet, vae, E.conditioning(11), context=EMPTY)
    with pytest.raises(ValueError, match="'negative' is not connected"):
        FaceFeatures.execute(refnet, vae, REF_PX, False, AUTO, 0, images=crops(1))


def test_auto_with_flashface_weights_needs_the_negative_and_says_how(flashface, vae):
    _, refnet = flashface
    with pytest.raises(ValueError, match=r"reference_context is 'auto.*' \(with flashface-tiny.*: negative prompt\) "
                                         r"but 'negative' is not connected; connect the negative CONDITIONING"):
        features(refnet, vae)
    with pytest.raises(ValueError, match="reference_context is 'negative prompt' but 'negative' is not connected"):
        features(refnet, vae, context=NEGATIVE)


def test_a_combined_or_batched_negative_is_refused_naming_the_input(flashface, vae):
    _, refnet = flashface
    with pytest.raises(ValueError, match="'negative' holds 2 conditionings"):
        features(refnet, vae, E.conditioning(1) + E.conditioning(2))
    with pytest.raises(ValueError, match="'negative' is a batch of 2 encodings"):
        features(refnet, vae, [[torch.randn(2, 77, WIDTH), {}]])
    with pytest.raises(ValueError, match="'negative' gives 32-wide text features but the model expects 64"):
        features(refnet, vae, [[torch.randn(1, 77, 32), {}]])


def test_training_free_auto_is_the_empty_prompt(sd15, vae):
    """Training-free: auto means the empty prompt, which needs the CLIP."""
    refnet = E.training_free_features(sd15, E.identity(1)).refnet
    with pytest.raises(ValueError, match=r"'auto.*' \(with training-free: empty prompt\) but 'clip' is not connected"):
        features(refnet, vae, E.conditioning(1))
    feats = features(refnet, vae, E.conditioning(1), context=NEGATIVE)
    assert torch.equal(feats.identities[0].context, E.conditioning(1)[0][0])


# --- four references ----------------------------------------------------------------------------

@pytest.mark.parametrize("n, count, kind, expected", [
    (1, 0, "flashface", (4,)), (2, 0, "flashface", (2, 2)), (3, 0, "flashface", (2, 1, 1)), (4, 0, "flashface", None),
    (5, 0, "flashface", None), (3, 0, "training-free", None), (3, 4, "training-free", (2, 1, 1)),
    (2, 5, "flashface", (3, 2)), (2, 1, "flashface", None),
])
def test_reference_count_repeats_references_in_turn(host, n, count, kind, expected):
    from IDFusion.nodes.reference import reference_counts
    assert reference_counts(count, n, kind) == expected


def test_features_count_flashface_references_as_four(flashface, vae):
    _, refnet = flashface
    assert features(refnet, vae, E.conditioning(1), n=3).identities[0].counts == (2, 1, 1)
    assert features(refnet, vae, E.conditioning(1), n=3, count=3).identities[0].counts is None


@pytest.mark.parametrize("n", [1, 2, 3])
def test_counted_references_equal_the_explicitly_padded_references(flashface, n):
    """The patched FlashFace MODEL with n references counted to four equals the same MODEL with
    the four padded references (r1, r2, r3, r1 …) as distinct latents, at a fraction of the
    reference keys; and differs from the n references counted once."""
    from IDFusion.models.references import ReferenceFeatures, ReferenceIdentity, cyclic_counts
    model, refnet = flashface
    latents, context = torch.randn(n, 4, 8, 8, generator=E.gen(n)), E.context(3)
    padded = latents[[i % n for i in range(4)]]
    outputs = {}
    for name, ident in (("counted", ReferenceIdentity("c", latents, context, counts=cyclic_counts(n, 4))),
                        ("padded", ReferenceIdentity("p", padded, context)),
                        ("once", ReferenceIdentity("o", latents, context))):
        outputs[name] = E.denoised_once(E.plain_guider(patched(model, ReferenceFeatures(refnet, (ident,), (1.0,)), 1.2),
                                                       E.conditioning(5)))
    scale = float(outputs["padded"].abs().max())
    assert float((outputs["counted"] - outputs["padded"]).abs().max()) <= 1e-5 * scale
    assert float((outputs["once"] - outputs["padded"]).abs().max()) > 1e-3 * scale


def test_an_sdxl_negative_gives_the_adm_vector_of_the_reference_crop(vae):
    """SDXL-style models: the pooled output of the negative CONDITIONING, at the crop's size (the
    conditioning's own width/height keys do not clash)."""
    sdxl = models.tiny_sdxl()
    refnet = E.training_free_features(sdxl, E.identity(1)).refnet
    pooled = torch.randn(1, 1280, generator=E.gen(2))
    negative = [[E.context(1), {"pooled_output": pooled, "width": 1024, "height": 1024}]]
    ident = features(refnet, vae, negative, context=NEGATIVE).identities[0]
    want = sdxl.model.encode_adm(pooled_output=pooled, width=REF_PX, height=REF_PX, crop_w=0, crop_h=0,
                                 target_width=REF_PX, target_height=REF_PX, device="cpu")
    assert torch.equal(ident.y, want.float())
