"""Bad inputs caught where they come in, in process: damaged and refused weight files, face crops
(too small; grayscale and RGBA converted), FEATURES of another model family or of FlashFace's
MODEL, and where the disk cache lives. (The same cases through the server: tests/e2e/test_bad_inputs.py.)"""
import pytest
import torch
from safetensors.torch import save_file

from idf_testlib import engine as E
from idf_testlib import flashface_fixtures as fx
from idf_testlib import models

AUTO = "auto (FlashFace: decoder)"
MIX = "mix (weights)"
ALL = "all (input + middle + output)"
TRAINING_FREE_ADAPTER = "training-free (self-attention projections)"


# --- weight files ---------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "good.pth"
    torch.save({"a": torch.randn(300, 300), "b": torch.zeros(3)}, path)
    return path


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("how, reason", [
    ("empty", "it is empty (0 bytes)"),
    ("truncated", "it cannot be read as a checkpoint (PytorchStreamReader failed reading zip archive: failed finding "
                  "central directory)"),
    ("legacy truncated", "it cannot be read as a checkpoint (unexpected EOF, expected"),
    ("garbage", "it cannot be read as a checkpoint (Weights only load failed"),
])
def test_a_damaged_checkpoint_is_reported_as_damaged(tmp_path, checkpoint, how, reason):
    from IDFusion.models.files import WeightFileError, load_state_dict
    data = checkpoint.read_bytes()
    if how == "legacy truncated":
        torch.save({"a": torch.randn(300, 300)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
        data = (tmp_path / "legacy.pth").read_bytes()
    blob = {"empty": b"", "truncated": data[: len(data) // 2], "legacy truncated": data[: len(data) // 2],
            "garbage": bytes(range(256)) * 8}[how]
    path = write(tmp_path / "bad.pth", blob)
    with pytest.raises(WeightFileError) as error:
        load_state_dict(path)
    assert str(error.value).startswith(f"bad.pth is damaged: {reason}")
    assert "the file is truncated or corrupt, download (or copy) it again" in str(error.value)


def test_a_truncated_safetensors_file_is_reported_as_damaged(tmp_path):
    from IDFusion.models.files import WeightFileError, load_state_dict
    save_file({"a": torch.randn(300, 300)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    with pytest.raises(WeightFileError, match=r"^cut.safetensors is damaged: it is not a complete .safetensors file "
                                              r"\(Error while deserializing header: incomplete metadata"):
        load_state_dict(write(tmp_path / "cut.safetensors", data[:-100]))


class Trap:
    """Unpickling this would create a file: weights-only loading must refuse it (and say so, not 'damaged')."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_not_called_damaged(tmp_path):
    from IDFusion.models.files import WeightFileError, load_state_dict
    marker = tmp_path / "ran"
    torch.save({"x": Trap(marker)}, tmp_path / "trap.pth")
    with pytest.raises(WeightFileError, match="^trap.pth holds pickled objects other than tensors; loading them is "
                                              "unsafe and refused"):
        load_state_dict(tmp_path / "trap.pth")
    assert not marker.exists()


def test_a_truncated_flashface_checkpoint_is_reported_as_damaged(tmp_path):
    from IDFusion.models.flashface.weights import load_flashface
    data = fx.write_tiny_checkpoints()["ckpt"].read_bytes()
    path = write(tmp_path / "flashface.ckpt", data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"^flashface.ckpt is damaged: it cannot be read as a checkpoint "
                                         r"\(PytorchStreamReader failed reading zip archive.*download \(or copy\) it "
                                         r"again. Put the official flashface.ckpt"):
        load_flashface(path)


@pytest.mark.parametrize("name", ["ConsistentID-v1.bin", "ConsistentID-v1.safetensors"])
def test_a_truncated_consistentid_file_is_reported_as_damaged(tmp_path, name):
    from IDFusion.models.consistentid.weights import load
    tensors = {"FacialEncoder.visual_projection.weight": torch.randn(300, 300)}
    whole = tmp_path / f"whole-{name}"
    if name.endswith(".safetensors"):
        save_file(tensors, str(whole))
    else:
        torch.save(tensors, whole)
    data = whole.read_bytes()
    path = write(tmp_path / name, data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"^{name} is damaged: .*download \(or copy\) it again. ConsistentID files "
                                         rf".* belong in models/consistentid/"):
        load(str(path))


# --- face crops ---------------------------------------------------------------------------------------

def test_face_crops_convert_grayscale_and_rgba_and_refuse_tiny_ones():
    from IDFusion.models.faces.analysis import face_crops
    gray = torch.rand(2, 40, 36, 1)
    assert torch.equal(face_crops(gray, "x"), gray.expand(-1, -1, -1, 3))
    rgb, alpha = torch.rand(1, 40, 36, 3), torch.rand(1, 40, 36, 1)
    assert torch.equal(face_crops(torch.cat([rgb, alpha], -1), "x"), rgb * alpha)
    assert torch.equal(face_crops(rgb, "x"), rgb)
    with pytest.raises(ValueError, match=r"^IDFusionFaceFeatures: 'images' is 36×31 pixels \(w×h\); a face crop needs "
                                         r"at least 32 pixels on each side: connect face crops"):
        face_crops(torch.rand(1, 31, 36, 3), "IDFusionFaceFeatures: 'images'")


def test_the_identity_node_refuses_a_one_pixel_crop():
    from IDFusion.nodes.identity import IdentityNode
    with pytest.raises(ValueError, match=r"^IDFusionIdentity: 'crops' is 1×1 pixels \(w×h\)"):
        IdentityNode.execute("a", 64, crops=torch.rand(1, 1, 1, 3))


# --- features and models --------------------------------------------------------------------------------

def reference(model, features):
    from IDFusion.nodes.reference import ReferenceAttention
    return ReferenceAttention.execute(model, features, 0.85, 0.0, 1.0, AUTO, MIX, "all").result[0]


def fused(model, features):
    from IDFusion.nodes.fusion import FusedKV
    return FusedKV.execute(model, features, 1.0, 0.0, 1.0, ALL, TRAINING_FREE_ADAPTER, MIX, "all").result[0]


def test_features_of_another_model_family_are_refused_at_the_patch_node(sd15):
    sdxl = models.tiny_sdxl()
    sd15_features = E.training_free_features(sd15, E.identity(1))
    with pytest.raises(ValueError, match=r"^IDFusionReferenceAttention: 'features' were encoded for an SD1.5 model .*"
                                         r"but 'model' is an SDXL model; connect this SDXL MODEL to 'IDFusion "
                                         r"ReferenceNet Loader'"):
        reference(sdxl, sd15_features)
    ident = E.identity(2)
    sdxl_ident = type(ident)(ident.label, ident.latents, ident.context, torch.zeros(1, sdxl.model.adm_channels))
    with pytest.raises(ValueError, match=r"^IDFusionFusedKV: 'features' were encoded for an SDXL model .*but 'model' "
                                         r"is an SD1.5 model"):
        fused(sd15, E.training_free_features(sdxl, sdxl_ident))


@pytest.fixture(scope="module")
def flashface(host):
    from IDFusion.nodes.loaders import load_flashface
    return load_flashface(str(fx.write_tiny_checkpoints()["safetensors"]))


def test_plain_features_on_flashfaces_model_and_the_reverse_are_refused(sd15, flashface):
    from IDFusion.models.references import ReferenceFeatures
    model, refnet = flashface
    with pytest.raises(ValueError, match=r"^IDFusionReferenceAttention: 'features' were encoded by a plain UNet .*"
                                         r"'model' is FlashFace's MODEL \(5 input channels\)"):
        reference(model, E.training_free_features(sd15, E.identity(1)))
    with pytest.raises(ValueError, match=r"^IDFusionFusedKV: 'features' were encoded with the FlashFace weights .*"
                                         r"'model' is not the FlashFace MODEL that loader returned"):
        fused(sd15, ReferenceFeatures(refnet, (E.identity(1),), (1.0,)))
    assert fused(model, ReferenceFeatures(refnet, (E.identity(1),), (1.0,))) is not model


# --- the disk cache's folder ---------------------------------------------------------------------------------

def test_the_disk_cache_lives_in_a_system_user_folder(host, monkeypatch, tmp_path):
    import os

    import folder_paths

    from IDFusion.nodes.reference import disk_cache_folder
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    assert disk_cache_folder() == os.path.join(str(tmp_path), "__idfusion", "feature_cache")
    assert folder_paths.get_public_user_directory("__idfusion") is None          # the web API's view: no such user
    monkeypatch.delattr(folder_paths, "get_system_user_directory")                # a host from before system users
    assert disk_cache_folder() == os.path.join(str(tmp_path), "__idfusion", "feature_cache")
