"""The weights key of the feature cache against the real host (tiny UNets in process): every
byte of every weight a reference pass reads counts — UNet tensors, LoRAs, model merges, weight
hooks, the FlashFace ReferenceNet — whatever object holds the same weights, and it is worked out
once per sampling run, never per step."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from idf_testlib import engine as E
from idf_testlib import flashface_fixtures as fx
from idf_testlib import models

LORA_KEY = "output_blocks.3.1.transformer_blocks.0.attn2.to_k"


def key_of(patcher, refnet=None) -> str:
    """The weights key a reference pass on ``patcher`` gets in a new sampling run."""
    from IDFusion.models import fingerprint
    patcher.pre_run()                              # what the host does at the start of sampling
    fingerprint.begin_run()
    refnet = refnet or E.training_free_features(patcher, E.identity(1)).refnet
    return fingerprint.weights_fingerprint(patcher.model, refnet)


def hashed() -> int:
    from IDFusion.models import fingerprint
    return fingerprint.stats()["tensors_hashed"]


def set_element(tensor: torch.Tensor, index: int, value: float) -> None:
    with torch.no_grad():
        tensor.view(-1)[index] = value


@pytest.fixture
def fresh():
    """A tiny SD1.5 UNet of its own (tests change its weights)."""
    return models.tiny_sd15(seed=0)


@pytest.mark.parametrize("name, index", [
    ("input_blocks.0.0.weight", 0),                                      # the first tensor, first element
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 1001),   # cross-attention keys (Custom Diffusion)
    ("output_blocks.8.1.transformer_blocks.0.attn2.to_v.weight", -1),    # cross-attention values, last element
    ("middle_block.1.norm.bias", 7),
    ("out.2.bias", 3),                                                   # the last tensor
])
def test_one_element_of_any_unet_tensor_changes_the_key(fresh, name, index):
    tensor = fresh.model.diffusion_model.state_dict(keep_vars=True)[name]
    before = key_of(fresh)
    original = float(tensor.view(-1)[index])
    set_element(tensor, index, original + 0.5)
    changed = key_of(fresh)
    set_element(tensor, index, original)
    assert changed != before and key_of(fresh) == before


def test_the_same_weights_in_another_model_object_have_the_same_key(sd15, fresh):
    assert key_of(models.tiny_sd15(seed=0)) == key_of(fresh)
    assert key_of(models.tiny_sd15(seed=1)) != key_of(fresh)


def lora(model, seed: int, tweak: int | None = None, rank: int = 4):
    """A LoRA on one block's cross-attention keys in the real file layout, applied by the host's own
    loader; ``tweak``: one element of lora_up changed (the file then differs in one tensor, one value)."""
    import comfy.sd
    weight = model.model.diffusion_model.state_dict()[LORA_KEY + ".weight"]
    gen = torch.Generator().manual_seed(seed)
    name = "lora_unet_" + LORA_KEY.replace(".", "_")
    sd = {f"{name}.lora_up.weight": torch.randn(weight.shape[0], rank, generator=gen),
          f"{name}.lora_down.weight": torch.randn(rank, weight.shape[1], generator=gen),
          f"{name}.alpha": torch.tensor(float(rank))}
    if tweak is not None:
        sd[f"{name}.lora_up.weight"].view(-1)[tweak] += 1.0
    patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    return patched


def test_loras_differing_in_one_value_have_different_keys(sd15):
    one = key_of(lora(sd15, seed=3))
    assert key_of(lora(sd15, seed=3)) == one                    # the same file loaded again
    assert key_of(lora(sd15, seed=3, tweak=1)) != one          # one value of one tensor differs
    assert key_of(lora(sd15, seed=3, tweak=101)) != one
    assert key_of(sd15) != one


def test_model_merges_differing_in_one_value_have_different_keys(sd15):
    from comfy_extras.nodes_model_merging import ModelMergeSimple
    other, tweaked = models.tiny_sd15(seed=5), models.tiny_sd15(seed=5)
    set_element(tweaked.model.diffusion_model.state_dict(keep_vars=True)[LORA_KEY + ".weight"], 17, 3.0)
    merge = ModelMergeSimple().merge
    half = key_of(merge(sd15, other, 0.5)[0])
    assert key_of(merge(sd15, tweaked, 0.5)[0]) != half
    assert key_of(merge(sd15, other, 0.25)[0]) != half
    assert key_of(merge(sd15, models.tiny_sd15(seed=5), 0.5)[0]) == half


def test_weights_the_host_patches_in_place_keep_the_key_of_base_and_patches(sd15):
    """Loading a patched model swaps patched weights into the UNet (originals in the backup):
    the key stays that of the originals plus the pending patches."""
    import comfy.model_management as mm
    patched = lora(sd15, seed=3)
    pending = key_of(patched)
    mm.load_models_gpu([patched])                  # as sampling loads it: other clones unloaded, patches applied
    try:
        assert patched.backup, "the host kept no originals: this test no longer tests in-place patching"
        assert key_of(patched) == pending
    finally:
        mm.unload_all_models()
    assert key_of(patched) == pending and key_of(sd15) != pending


def test_weight_hooks_applied_at_the_call_enter_the_key(sd15):
    import comfy.hooks
    import comfy.sd
    name = "lora_unet_" + LORA_KEY.replace(".", "_")
    weight = sd15.model.diffusion_model.state_dict()[LORA_KEY + ".weight"]
    gen = torch.Generator().manual_seed(9)
    sd = {f"{name}.lora_up.weight": torch.randn(weight.shape[0], 2, generator=gen),
          f"{name}.lora_down.weight": torch.randn(2, weight.shape[1], generator=gen)}
    tweaked = {k: v.clone() for k, v in sd.items()}
    tweaked[f"{name}.lora_up.weight"].view(-1)[5] += 1.0
    keys = []
    for lora_sd in (sd, tweaked, sd):
        hooks = comfy.hooks.create_hook_lora(lora_sd, 1.0, 1.0)
        m = sd15.clone()
        m.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model))
        m.pre_run()
        m.current_hooks = hooks           # what apply_hooks leaves for the call (weights patched in place)
        from IDFusion.models import fingerprint
        fingerprint.begin_run()
        keys.append(fingerprint.weights_fingerprint(m.model, E.training_free_features(m, E.identity(1)).refnet))
    assert keys[0] != keys[1] and keys[0] == keys[2] and keys[0] != key_of(sd15)


def flashface_variant(tmp_path, name: str, tweak: bool):
    """The tiny official FlashFace checkpoint, or a copy differing in one value of one ReferenceNet tensor."""
    sd = load_file(str(fx.write_tiny_checkpoints()["safetensors"]))
    key = next(k for k in sorted(sd) if k.startswith("ref_encoder.") and k.endswith(".weight") and sd[k].ndim == 2)
    if tweak:
        sd[key].view(-1)[3] += 1.0
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def test_the_flashface_reference_net_weights_enter_the_key(tmp_path):
    from IDFusion.nodes.loaders import load_flashface
    base = load_flashface(str(flashface_variant(tmp_path, "a.safetensors", tweak=False)))
    again = load_flashface(str(flashface_variant(tmp_path, "copy/a.safetensors", tweak=False)))
    other = load_flashface(str(flashface_variant(tmp_path, "b.safetensors", tweak=True)))
    assert key_of(base[0], base[1]) == key_of(again[0], again[1])
    assert key_of(other[0], other[1]) != key_of(base[0], base[1])
    assert key_of(base[0], base[1]) != key_of(base[0])                   # FlashFace vs training-free


def test_weights_are_hashed_once_per_model_and_the_key_once_per_run(fresh):
    from IDFusion.models import fingerprint
    from IDFusion.nodes.reference import AUTO, ReferenceAttention
    features = E.training_free_features(fresh, E.identity(1))
    patched = ReferenceAttention.execute(fresh, features, 0.85, 0.0, 1.0, AUTO, "mix (weights)", "all").result[0]
    tensors = len(fresh.model.diffusion_model.state_dict())
    before, keys = hashed(), fingerprint.stats()["fingerprints"]
    E.sample(patched, steps=3)
    assert hashed() - before == tensors and fingerprint.stats()["fingerprints"] - keys == 1
    E.sample(patched, seed=1, steps=3)
    assert hashed() - before == tensors and fingerprint.stats()["fingerprints"] - keys == 2


def test_a_model_differing_in_one_weight_gets_its_own_features(sd15, fresh):
    """The second model's run performs its own reference passes and equals a run from an empty cache."""
    from IDFusion.models.feature_cache import FEATURE_CACHE
    from IDFusion.nodes.reference import AUTO, ReferenceAttention

    def run(model):
        features = E.training_free_features(model, E.identity(1))
        patched = ReferenceAttention.execute(model, features, 0.85, 0.0, 1.0, AUTO, "mix (weights)", "all").result[0]
        return E.sample(patched, steps=2)

    set_element(fresh.model.diffusion_model.state_dict(keep_vars=True)[
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"], 1001, 2.0)
    run(sd15)
    before = FEATURE_CACHE.stats()["reference_passes"]
    after_other = run(fresh)
    assert FEATURE_CACHE.stats()["reference_passes"] - before == 2
    FEATURE_CACHE.clear()
    assert torch.equal(run(fresh), after_other)
