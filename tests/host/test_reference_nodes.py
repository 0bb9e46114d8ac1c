"""Reference nodes' input handling and FlashFace loading in process: clear errors, memory
management of owned weights, where training-free references apply."""
import pytest
import torch

from idf_testlib import engine as E
from idf_testlib.flashface_fixtures import write_tiny_checkpoints


@pytest.fixture(scope="module")
def flashface(sd15):
    from IDFusion.nodes.loaders import ReferenceNetLoader
    return ReferenceNetLoader.execute(sd15, write_tiny_checkpoints()["safetensors"].name).result


def test_features_need_exactly_one_source_and_a_non_empty_batch(sd15):
    from IDFusion.nodes.reference import FaceFeatures
    refnet = E.training_free_features(sd15, E.identity(1)).refnet
    with pytest.raises(ValueError, match="exactly one of 'images'.*or 'identity'"):
        FaceFeatures.execute(refnet, None, 224, False, "empty prompt", 0)
    with pytest.raises(ValueError, match="'images' is an empty or malformed batch"):
        FaceFeatures.execute(refnet, None, 224, False, "empty prompt", 0, images=torch.zeros(0, 64, 64, 3))


def test_a_file_that_is_not_flashface_is_refused_naming_the_keys(sd15, tmp_path):
    import folder_paths
    from safetensors.torch import save_file
    from IDFusion.nodes.loaders import ReferenceNetLoader
    folder = folder_paths.get_folder_paths("flashface")[0]
    path = tmp_path / "not-flashface.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    target = f"{folder}/not-flashface.safetensors"
    path.replace(target)
    try:
        with pytest.raises(ValueError, match=r"(?s)ref_encoder.*model\.diffusion_model"):
            ReferenceNetLoader.execute(sd15, "not-flashface.safetensors")
    finally:
        import os
        os.remove(target)
    with pytest.raises(FileNotFoundError, match="not in models/flashface"):
        ReferenceNetLoader.execute(sd15, "missing.ckpt")


def test_flashface_weights_are_under_the_hosts_memory_management(flashface):
    model, refnet = flashface
    owned = model.model_patches_models()
    assert refnet.modules.patcher in owned
    names = {n for n, _ in refnet.modules.module.named_parameters()}
    assert any(n.startswith("extra_attention.output_3_0") for n in names)
    assert any(n.startswith("input_blocks.0.0") for n in names)
    assert model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 5


def test_flashface_model_samples_and_the_reference_changes_it(flashface):
    from IDFusion.nodes.reference import ReferenceAttention
    from IDFusion.models.references import ReferenceFeatures
    model, refnet = flashface
    features = ReferenceFeatures(refnet, (E.identity(1, count=4),), (1.0,))
    plain = E.sample(model, steps=2)
    patched = ReferenceAttention.execute(model, features, 0.85, 0.0, 1.0, "auto (FlashFace: decoder)",
                                         "mix (weights)", "all").result[0]
    assert torch.isfinite(plain).all()
    assert not torch.allclose(E.sample(patched, steps=2), plain)
    assert torch.equal(E.sample(model, steps=2), plain)
    with pytest.raises(ValueError, match="decoder only"):
        ReferenceAttention.execute(model, features, 0.85, 0.0, 1.0, "all (input + middle + output)", "mix (weights)", "all")


def test_flashface_features_need_the_flashface_model(sd15, flashface):
    from IDFusion.nodes.reference import ReferenceAttention
    from IDFusion.models.references import ReferenceFeatures
    _, refnet = flashface
    features = ReferenceFeatures(refnet, (E.identity(1),), (1.0,))
    with pytest.raises(ValueError, match="not the FlashFace MODEL"):
        ReferenceAttention.execute(sd15, features, 0.85, 0.0, 1.0, "auto (FlashFace: decoder)", "mix (weights)", "all")


def test_training_free_position_mask_limits_where_references_apply(sd15):
    """At the first patched block, tokens outside the position mask equal the unpatched model's
    (up to the rounding of the two attention kernels: the self part of a row with references is
    computed by the log-sum-exp kernel)."""
    from IDFusion.nodes.reference import ReferenceAttention
    features = E.training_free_features(sd15, E.identity(1))
    mask = torch.zeros(128, 128)
    mask[:, :64] = 1                                              # left half of a 16×16 latent
    outputs = {}
    for name, model in (("plain", sd15), ("patched", ReferenceAttention.execute(
            sd15, features, 0.9, 0.0, 1.0, "auto (FlashFace: decoder)", "mix (weights)", "all",
            position_mask=mask).result[0])):
        m = model.clone()

        def capture(n, extra):
            if tuple(extra["block"]) == ("middle", 0):
                outputs.setdefault(name, n.clone())
            return n
        m.set_model_attn1_output_patch(capture)
        E.sample(m, steps=1)
    left = torch.tensor([True, False, True, False])               # middle block: 2×2 tokens
    torch.testing.assert_close(outputs["patched"][:, ~left], outputs["plain"][:, ~left], rtol=1e-5, atol=1e-5)
    assert (outputs["patched"][:, left] - outputs["plain"][:, left]).abs().max() > 1e-2
