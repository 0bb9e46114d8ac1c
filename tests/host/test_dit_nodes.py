"""The DiT nodes as ComfyUI runs them (ComfyUI 0.17.0+): random-weight Flux.1 and Flux.2 VAEs in the
real layouts encode face crops into references; every mistake a user can make fails by name."""
import pytest
import torch

from idf_testlib import dit_fixtures as F
from idf_testlib import dit_models as D

pytestmark = pytest.mark.usefixtures("dit_host")


@pytest.fixture(scope="module")
def flux_vae():
    return F.load_vae(F.flux_vae())


@pytest.fixture(scope="module")
def flux2_vae():
    return F.load_vae(F.flux2_vae())


def crops(count, seed=0, size=80):
    return torch.rand(count, size, size, 3, generator=D.gen(seed))


def identity(count, seed=0, label="person"):
    from IDFusion.models.faces.identity import Identity
    return Identity(crops(count, seed), label)


def dit_features(model, vae, **kw):
    from IDFusion.nodes.dit import DiTFaceFeatures
    args = dict(model=model, vae=vae, empty_prompt=D.conditioning(9), size=64, disk_cache=False)
    args.update(kw)
    return DiTFaceFeatures.execute(**args).result[0]


def identity_references(model, vae, positive, negative, people, masks=None, size=64, outside="all"):
    from IDFusion.nodes.dit import DiTIdentityReferences
    kwargs = {f"identity_{i + 1}": ident for i, (ident, _) in enumerate(people)}
    strengths = {f"strength_{i}": 1.0 for i in range(1, 5)}
    strengths.update({f"strength_{i + 1}": s for i, (_, s) in enumerate(people)})
    return DiTIdentityReferences.execute(model=model, positive=positive, negative=negative, vae=vae, size=size,
                                         outside=outside, identity_masks=masks, **strengths, **kwargs).result


# --- IDFusion DiT Face Features ----------------------------------------------------------------

def test_face_features_encode_crops_in_the_models_latent_space(flux_vae):
    model = D.tiny_dit("flux")
    feats = dit_features(model, flux_vae, identity=identity(3))
    (ident,) = feats.identities
    assert feats.refnet.kind == "dit" and ident.label == "person"
    assert ident.latents.shape == (3, 16, 8, 8)
    want = model.model.process_latent_in(flux_vae.encode(_padded(crops(3), 64)))
    torch.testing.assert_close(ident.latents, want.float())
    assert ident.context.shape == (1, 6, D.CONTEXT) and ident.y.shape == (1, D.POOLED)


def _padded(images, size):
    from IDFusion.models.faces.analysis import pad_to_square
    return pad_to_square(images, size)


def test_face_features_then_reference_attention_sample(flux_vae):
    from IDFusion.nodes.dit import BLOCKS_ALL, TIMESTEP_ZERO, DiTReferenceAttention
    model = D.tiny_dit("flux")
    feats = dit_features(model, flux_vae, images=crops(2, seed=3))
    patched = DiTReferenceAttention.execute(model, feats, 0.8, 0.0, 1.0, BLOCKS_ALL, TIMESTEP_ZERO, "mix (weights)",
                                            "all").result[0]
    positive = D.conditioning(4)
    out = D.sample(patched, positive)
    assert torch.isfinite(out).all() and not torch.allclose(out, D.sample(model, positive))


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "connect exactly one of 'images'"),
    (dict(images=torch.rand(1, 64, 64, 3), identity="both"), "connect exactly one of 'images'"),
    (dict(images=torch.rand(0, 64, 64, 3)), "'images' must be an IMAGE batch"),
    (dict(images=torch.rand(1, 64, 64, 3), empty_prompt=[[torch.rand(1, 8), {}]]), "'empty_prompt' is not a text"),
])
def test_face_features_input_errors(flux_vae, kwargs, message):
    if kwargs.get("identity") == "both":
        kwargs["identity"] = identity(1)
    with pytest.raises(ValueError, match=message) as err:
        dit_features(D.tiny_dit("flux"), flux_vae, **kwargs)
    assert str(err.value).startswith("IDFusionDiTFaceFeatures: ")


def test_face_features_refuse_the_vae_of_another_family(flux2_vae):
    with pytest.raises(ValueError, match="'vae' makes 128-channel latents but the model uses 16"):
        dit_features(D.tiny_dit("flux"), flux2_vae, images=crops(1))


def test_dit_nodes_refuse_a_unet_model(sd15, flux_vae):
    with pytest.raises(ValueError, match=r"IDFusionDiTFaceFeatures: 'model' is a BaseModel model; the DiT nodes patch"):
        dit_features(sd15, flux_vae, images=crops(1))


# --- IDFusion DiT Reference Attention ----------------------------------------------------------

def reference_attention(model, features, **kw):
    from IDFusion.nodes.dit import BLOCKS_ALL, TIMESTEP_ZERO, DiTReferenceAttention
    args = dict(strength=0.8, start_percent=0.0, end_percent=1.0, blocks=BLOCKS_ALL, reference_timestep=TIMESTEP_ZERO,
                identity_mode="mix (weights)", outside="all")
    args.update(kw)
    return DiTReferenceAttention.execute(model, features, **args)


def test_reference_attention_errors(sd15, flux_vae):
    from idf_testlib import engine as E
    from IDFusion.models.masks import IdentityMasks
    model = D.tiny_dit("flux")
    feats = dit_features(model, flux_vae, images=crops(1))
    with pytest.raises(ValueError, match="IDFusionDiTReferenceAttention: 'features' were encoded for a UNet"):
        reference_attention(model, E.training_free_features(sd15, E.identity(1)))
    with pytest.raises(ValueError, match="IDFusionDiTReferenceAttention: start_percent"):
        reference_attention(model, feats, start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="IDFusionDiTReferenceAttention: 'identity_masks' has 2 region"):
        reference_attention(model, feats, identity_mode="by region (identity masks)",
                            identity_masks=IdentityMasks(torch.ones(2, 8, 8), ("a", "b")))
    with pytest.raises(ValueError, match="IDFusionDiTReferenceAttention: this Qwen-Image .* has no single blocks"):
        reference_attention(D.tiny_dit("qwen_image"), feats, blocks="single blocks")


def test_the_unet_nodes_refuse_dit_features(sd15, flux_vae):
    from IDFusion.nodes.reference import ReferenceAttention
    feats = dit_features(D.tiny_dit("flux"), flux_vae, images=crops(1))
    with pytest.raises(ValueError, match="IDFusionReferenceAttention: 'features' come from 'IDFusion DiT Face"):
        ReferenceAttention.execute(sd15, feats, 0.8, 0.0, 1.0, "auto (FlashFace: decoder)", "mix (weights)", "all")


# --- IDFusion DiT Identity References ----------------------------------------------------------

def test_identity_references_append_every_crop_to_both_conditionings(flux2_vae):
    model = D.tiny_dit("flux2")
    shared = D.latent(model, 4, 4, seed=1)
    positive = D.with_references(D.conditioning(4, pooled=False), [shared])
    negative = D.with_references(D.conditioning(5, pooled=False), [shared])
    patched, pos, neg = identity_references(model, flux2_vae, positive, negative,
                                            [(identity(1, seed=1), 1.0), (identity(2, seed=2), 0.5)])
    for out in (pos, neg):
        refs = out[0][1]["reference_latents"]
        assert len(refs) == 4 and refs[0] is shared and all(r.shape == (1, 128, 4, 4) for r in refs[1:])
    assert "reference_latents" not in positive[0][1] or len(positive[0][1]["reference_latents"]) == 1
    from IDFusion.models.dit.engine import PLAN
    spec = patched.model_options["transformer_options"][PLAN].people
    assert (spec.shared, spec.counts, spec.strengths) == (1, (1, 2), (1.0, 0.5))
    out = D.sample(patched, pos, neg, h=4, w=4)
    assert torch.isfinite(out).all()


def test_identity_references_errors(flux2_vae, flux_vae):
    from IDFusion.models.masks import IdentityMasks
    model = D.tiny_dit("flux2")
    positive, negative = D.conditioning(4, pooled=False), D.conditioning(5, pooled=False)
    person = [(identity(1), 1.0)]
    node = "IDFusionDiTIdentityReferences: "
    with pytest.raises(ValueError, match=node + "Chroma takes no reference latents"):
        identity_references(D.tiny_dit("chroma"), flux_vae, positive, negative, person)
    with pytest.raises(ValueError, match=node + "'positive' and 'negative' carry different numbers"):
        identity_references(model, flux2_vae, D.with_references(positive, [D.latent(model, 4, 4, seed=1)]), negative,
                            person)
    with pytest.raises(ValueError, match=node + "'identity_masks' has 2 region"):
        identity_references(model, flux2_vae, positive, negative, person,
                            masks=IdentityMasks(torch.ones(2, 8, 8), ("a", "b")))
    once = identity_references(model, flux2_vae, positive, negative, person)[0]
    with pytest.raises(ValueError, match=node + "'model' already went through this node"):
        identity_references(once, flux2_vae, positive, negative, person)
    with pytest.raises(ValueError, match=node + "'vae' makes 16-channel latents but the model uses 128"):
        identity_references(model, flux_vae, positive, negative, person)
