"""What newer hosts manage their own way, done their way, on every host: the pack's weights in
the host's own patcher class, patches that follow the model being run (never the modules of
the model they were made from), and cleanup() after sampling."""
import pytest
import torch

from idf_testlib import engine as E
from idf_testlib import models
from idf_testlib.flashface_fixtures import write_tiny_checkpoints
from idf_testlib.paths import CACHE

ALL = "all (input + middle + output)"
DECODER = "decoder (middle + output)"
TRAINING_FREE = "training-free (self-attention projections)"
MIX, REGION = "mix (weights)", "by region (identity masks)"


def reference(model, features, **kw):
    from IDFusion.nodes.reference import ReferenceAttention
    return ReferenceAttention.execute(model, features, 0.9, 0.0, 1.0, kw.pop("blocks", DECODER),
                                      kw.pop("mode", MIX), "all", **kw).result[0]


def fused(model, features, adapter=TRAINING_FREE, **kw):
    from IDFusion.nodes.fusion import FusedKV
    return FusedKV.execute(model, features, 1.0, 0.0, 1.0, kw.pop("blocks", ALL), adapter, kw.pop("mode", MIX),
                           "all", **kw).result[0]


def with_other_weights(seed: int):
    """A second model object: the ``sd15`` fixture's UNet with other self-attention projections."""
    other = models.tiny_sd15()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.model.diffusion_model.named_parameters():
            if ".attn1.to_k." in name or ".attn1.to_v." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return other


def moved_onto(patched, other):
    """``patched``'s patches on another model object, as the host's clone with a model override
    (dynamic VRAM's non-dynamic delegate) makes it; older hosts: a clone given the other model."""
    if hasattr(other, "get_clone_model_override"):
        return patched.clone(model_override=other.get_clone_model_override())
    clone = patched.clone()     # hosts whose clone() takes no model override
    clone.model = other.model
    return clone


@pytest.mark.parametrize("patch", [reference, fused], ids=["reference attention", "fused kv"])
def test_patches_use_the_model_being_run(sd15, patch):
    """A patched MODEL moved onto another model object computes with that model's projections:
    the same as patching the other model directly, not as the model the patch was made on."""
    other = with_other_weights(seed=4)
    features = E.training_free_features(sd15, E.identity(1))
    patched = patch(sd15, features)
    moved = moved_onto(patched, other)
    assert moved.model is other.model
    direct = E.sample(patch(other, features))
    assert torch.equal(E.sample(moved), direct)
    assert not torch.allclose(direct, E.sample(patched))


def test_patch_objects_hold_no_module_of_the_model(sd15):
    """No patch object reaches a parameter of the UNet it was made from."""
    features = E.training_free_features(sd15, E.identity(1))
    patched = fused(reference(sd15, features), features)
    unet_params = {id(p) for p in sd15.model.diffusion_model.parameters()}
    to = patched.model_options["transformer_options"]
    objects = [p for ps in to["patches_replace"].values() for p in ps.values()]

    def reachable(obj, depth=0):
        if isinstance(obj, torch.nn.Module):
            yield from obj.parameters()
        elif depth < 4 and isinstance(obj, (tuple, list)):
            for item in obj:
                yield from reachable(item, depth + 1)
        elif depth < 4 and hasattr(obj, "__dict__") and not torch.is_tensor(obj):
            for value in vars(obj).values():
                yield from reachable(value, depth + 1)
    held = {id(p) for obj in objects for p in reachable(obj)}
    assert objects and not held & unet_params


@pytest.fixture
def recording_patcher(host, monkeypatch):
    """The host's switchable patcher class, replaced as the host itself replaces it for dynamic
    VRAM (main.py sets ``comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic``)."""
    import comfy.model_patcher as mp
    base = getattr(mp, "CoreModelPatcher", mp.ModelPatcher)
    made = []

    class Recording(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(mp, "CoreModelPatcher", Recording, raising=False)
    return made


def test_flashface_weights_use_the_hosts_patcher_class(sd15, recording_patcher):
    from IDFusion.nodes.loaders import ReferenceNetLoader
    model, refnet = ReferenceNetLoader.execute(sd15, write_tiny_checkpoints()["safetensors"].name).result
    assert model in recording_patcher and refnet.modules.patcher in recording_patcher
    assert refnet.modules.patcher in model.model_patches_models()


def write_adapter(model, name: str, scale: float = 0.0) -> None:
    """A fused-KV adapter whose projections are the blocks' own self-attention to_k/to_v
    (plus ``scale``·noise): at scale 0 it must equal the training-free path exactly."""
    from safetensors.torch import save_file
    from IDFusion.models.unet_layout import transformer_blocks
    gen = torch.Generator().manual_seed(9)
    tensors = {}
    for key, block in transformer_blocks(model.model.diffusion_model).items():
        prefix = f"{key[0]}.{key[1]}.{key[2]}"
        for kv, layer in (("k", block.attn1.to_k), ("v", block.attn1.to_v)):
            w = layer.weight.detach().float()
            tensors[f"{prefix}.to_{kv}_face.weight"] = (w + scale * torch.randn(w.shape, generator=gen)).contiguous()
    folder = CACHE / "models" / "idfusion"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))


def test_trained_adapter_is_host_managed_and_equal_to_training_free_at_same_weights(sd15, recording_patcher):
    write_adapter(sd15, "idfusion-test-same.safetensors")
    write_adapter(sd15, "idfusion-test-other.safetensors", scale=0.2)
    features = E.training_free_features(sd15, E.identity(1, count=2))
    same = fused(sd15, features, adapter="idfusion-test-same.safetensors")
    owned = {id(p): p for p in same.model_patches_models()}
    assert len(owned) == 1 and next(iter(owned.values())) in recording_patcher
    assert torch.equal(E.sample(same), E.sample(fused(sd15, features)))
    other = fused(sd15, features, adapter="idfusion-test-other.safetensors")
    assert not torch.allclose(E.sample(other), E.sample(same))


def test_a_misshapen_adapter_is_refused_naming_the_key(sd15):
    from safetensors.torch import save_file
    write_adapter(sd15, "idfusion-test-bad.safetensors")
    path = CACHE / "models" / "idfusion" / "idfusion-test-bad.safetensors"
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    tensors["output.3.0.to_k_face.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    features = E.training_free_features(sd15, E.identity(1))
    with pytest.raises(ValueError, match=r"output\.3\.0\.to_k_face\.weight has shape \(3, 3\)"):
        fused(sd15, features, adapter="idfusion-test-bad.safetensors")


def test_cleanup_after_sampling_drops_what_patches_keep(sd15):
    """The host's cleanup after sampling reaches the pack's patches (newer hosts call cleanup()
    on patch objects; older ones through the patcher's cleanup callback)."""
    from IDFusion.models.masks import IdentityMasks
    features = E.training_free_features(sd15, E.identity(1), E.identity(2))
    masks = torch.zeros(2, 128, 128)
    masks[0, :, :64], masks[1, :, 64:] = 1, 1
    patched = fused(sd15, features, mode=REGION, identity_masks=IdentityMasks(masks, ("a", "b")))
    routing = patched.model_options["transformer_options"]["idfusion_plan"].specs[0].routing
    during = []
    import comfy.sample
    noise = torch.randn(1, 4, 16, 16, generator=E.gen(0))
    comfy.sample.sample(patched, noise, 2, 5.0, "euler", "normal", E.conditioning(5), E.conditioning(6),
                        torch.zeros_like(noise), disable_pbar=True, seed=0,
                        callback=lambda *_: during.append(len(routing._alpha)))
    assert during and all(during), "per-layer routing weights are kept between the calls of a run"
    assert routing._alpha == {}, "cleanup() did not run after sampling"
