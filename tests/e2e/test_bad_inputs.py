"""Bad inputs through the real server, one matrix: every case must fail with a message that starts
with the IDFusion node that received the input (found only at sampling time: the host reports it
against the sampler, and the message still starts with the IDFusion node and input), names the
input and says what to do; and a normal prompt right after must succeed with the picture the same
prompt gives in a fresh server.

The messages are also written to ``test-artifacts/<host>/bad-input-messages.md``.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from idf_testlib import face_fixtures as faces
from idf_testlib import flashface_fixtures as ff
from idf_testlib import prompts, variants
from idf_testlib.paths import CACHE
from idf_testlib.prompts import Prompt
from idf_testlib.server import execution_error, execution_failure

PHOTO = prompts.FACE_PHOTO
SIZE = prompts.TEST_IMAGE_SIZE
ANTELOPE = "antelopev2"


# --- files and photos ---------------------------------------------------------------------------------

def truncated(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def adapter_file(path: Path, keys: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in keys.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def files(server, fresh_server, prepared):
    """Photos in both servers' input folders; wrong and damaged model files (removed afterwards)."""
    photos = {
        "idf_bad_astronaut.png": faces.astronaut(),
        "idf_bad_two_faces.png": faces.scene(240, 400, [faces.MarkerFace(100, 120, 60, 80),
                                                        faces.MarkerFace(300, 120, 75, 100)]),
        "idf_bad_tiny.png": np.full((16, 24, 3), 128, np.uint8),
        "idf_bad_1px.png": np.full((1, 1, 3), 200, np.uint8),
    }
    for srv in (server, fresh_server):
        for name, array in photos.items():
            Image.fromarray(array).save(srv.workdir / "input" / name)
    models = CACHE / "models"
    faces.facexlib_weights()
    pack = faces.insightface_pack(ANTELOPE)
    lora = variants.loras_dir() / variants.lora_pair()[0]
    made = [
        truncated(ff.write_tiny_checkpoints()["ckpt"], ff.flashface_dir() / "idf-bad-damaged.ckpt"),
        shutil.copy(lora, ff.flashface_dir() / "idf-bad-lora.safetensors"),
        truncated(adapter_file(models / "idfusion" / "idf-bad-full.safetensors",
                               {"output.3.0.to_k_face.weight": torch.zeros(640, 640)}),
                  models / "idfusion" / "idf-bad-damaged.safetensors"),
        adapter_file(models / "idfusion" / "idf-bad-wrong-keys.safetensors", {"something.else": torch.zeros(4, 4)}),
        truncated(faces.facexlib_root() / "parsing_bisenet.pth", faces.facexlib_root() / "parsing_idf_bad_damaged.pth"),
    ]
    torch.save({"conv.weight": torch.zeros(2, 2)}, faces.facexlib_root() / "parsing_idf_bad_wrong.pth")
    made.append(faces.facexlib_root() / "parsing_idf_bad_wrong.pth")
    damaged_pack = faces.insightface_root() / "models" / "idf_bad_damaged"
    shutil.copytree(pack, damaged_pack)
    truncated(pack / "glintr100.onnx", damaged_pack / "glintr100.onnx")
    no_detector = faces.insightface_root() / "models" / "idf_bad_no_detector"
    no_detector.mkdir(parents=True, exist_ok=True)
    shutil.copy(pack / "glintr100.onnx", no_detector / "glintr100.onnx")
    made += [models / "idfusion" / "idf-bad-full.safetensors"]
    yield
    for path in made:
        Path(path).unlink(missing_ok=True)
    for folder in (damaged_pack, no_detector):
        shutil.rmtree(folder, ignore_errors=True)


# --- graphs -------------------------------------------------------------------------------------------------

def saved(p: Prompt, image: list) -> Prompt:
    p.add("PreviewImage", images=image)
    return p


def detect(p: Prompt, photo: str, pack: str = ANTELOPE, **options) -> str:
    analyzer = p.add("IDFusionFaceAnalysisLoader", pack=pack, provider="auto", det_size=320)
    image = p.add("LoadImage", image=photo)
    settings = dict(selection="largest", index=0, min_score=0.5, no_face="error", crop_size=64, margin=0.0)
    settings.update(options)
    return p.add("IDFusionFaceDetect", analyzer=p.out(analyzer), image=p.out(image), **settings)


def detect_prompt(photo: str, pack: str = ANTELOPE, **options) -> Prompt:
    p = Prompt()
    return saved(p, p.out(detect(p, photo, pack, **options), 1))


def masks_node(p: Prompt, width=SIZE, height=SIZE, count=2, source="columns (left to right)", **optional) -> str:
    return p.add("IDFusionMultiIDMasks", width=width, height=height, count=count, source=source,
                 overlap="earlier identity wins", margin=0.5, **optional)


def masks_prompt(**kw) -> Prompt:
    p = Prompt()
    return saved(p, p.out(masks_node(p, **kw), 2))


def solid(p: Prompt, width: int, height: int, value: float = 1.0) -> list:
    return p.out(p.add("SolidMask", value=value, width=width, height=height))


def sd15_features(p: Prompt, photo: str = PHOTO, model: list | None = None, weights: str | None = None):
    """(checkpoint node, the MODEL the features were made on, FEATURES) with training-free (or FlashFace) weights."""
    ckpt = prompts.checkpoint(p)
    loader = p.add("IDFusionReferenceNetLoader", model=model or p.out(ckpt), weights=weights or prompts.TRAINING_FREE)
    image = p.add("LoadImage", image=photo)
    return ckpt, p.out(loader), p.out(prompts.features(p, p.out(loader, 1), ckpt, p.out(image)))


def tiny_sdxl(p: Prompt) -> list:
    return p.out(p.add("IDFusionTestTinyModel", family="SDXL", seed=0))


def flashface_name() -> str:
    return ff.write_tiny_checkpoint_for_sd15_clip().name


def patched_and_sampled(p: Prompt, node: str, model: list, feats: list, ckpt: str, width: int | None = None,
                        **extra) -> Prompt:
    make = prompts.reference_attention if node == "reference" else prompts.fused_kv
    prompts.sample_and_save(p, p.out(make(p, model, feats, **extra)), ckpt, "idf_bad", width=width)
    return p


def sd15_on_sdxl() -> Prompt:
    p = Prompt()
    ckpt, _, feats = sd15_features(p)
    return patched_and_sampled(p, "reference", tiny_sdxl(p), feats, ckpt)


def sdxl_on_sd15() -> Prompt:
    p = Prompt()
    ckpt, _, feats = sd15_features(p, model=tiny_sdxl(p))
    return patched_and_sampled(p, "fused", p.out(ckpt), feats, ckpt)


def plain_on_flashface() -> Prompt:
    p = Prompt()
    ckpt, _, feats = sd15_features(p)
    flashface = p.add("IDFusionReferenceNetLoader", model=p.out(ckpt), weights=flashface_name())
    return patched_and_sampled(p, "reference", p.out(flashface), feats, ckpt)


def flashface_on_plain() -> Prompt:
    p = Prompt()
    ckpt, _, feats = sd15_features(p, weights=flashface_name())
    return patched_and_sampled(p, "fused", p.out(ckpt), feats, ckpt)


def region_masks_at_sampling() -> Prompt:
    p = Prompt()
    ckpt, model, feats = sd15_features(p)
    regions = masks_node(p, width=2 * SIZE, height=SIZE, count=1)
    return patched_and_sampled(p, "reference", model, feats, ckpt, identity_mode=prompts.REGION,
                               identity_masks=p.out(regions))


def position_mask_at_sampling() -> Prompt:
    p = Prompt()
    ckpt, model, feats = sd15_features(p)
    return patched_and_sampled(p, "reference", model, feats, ckpt, position_mask=solid(p, 2 * SIZE, SIZE))


def region_count() -> Prompt:
    p = Prompt()
    ckpt, model, feats = sd15_features(p)
    regions = masks_node(p, count=2)
    return patched_and_sampled(p, "reference", model, feats, ckpt, identity_mode=prompts.REGION,
                               identity_masks=p.out(regions))


def tiny_crop() -> Prompt:
    p = Prompt()
    ckpt, model, feats = sd15_features(p, photo="idf_bad_1px.png")
    return patched_and_sampled(p, "reference", model, feats, ckpt)


def flashface_file(name: str) -> Prompt:
    p = Prompt()
    ckpt = prompts.checkpoint(p)
    loader = p.add("IDFusionReferenceNetLoader", model=p.out(ckpt), weights=name)
    feats = prompts.features(p, p.out(loader, 1), ckpt, p.out(p.add("LoadImage", image=PHOTO)))
    return patched_and_sampled(p, "reference", p.out(loader), p.out(feats), ckpt)


def adapter(name: str) -> Prompt:
    p = Prompt()
    ckpt, model, feats = sd15_features(p)
    return patched_and_sampled(p, "fused", model, feats, ckpt, adapter=name)


def parsing(name: str) -> Prompt:
    p = Prompt()
    parser = p.add("IDFusionFaceParsingLoader", model=name)
    image = p.add("LoadImage", image=PHOTO)
    return saved(p, p.out(p.add("IDFusionFaceParse", parser=p.out(parser), image=p.out(image), labels="hair"), 9))


def faces_count() -> Prompt:
    p = Prompt()
    found = detect(p, "idf_bad_two_faces.png", selection="left_to_right")
    return saved(p, p.out(masks_node(p, count=3, source="face boxes (left to right)", faces=p.out(found)), 2))


def wrong_mask_count() -> Prompt:
    p = Prompt()
    return saved(p, p.out(masks_node(p, count=2, source="masks (one per identity)", masks=solid(p, SIZE, SIZE)), 2))


def wrong_mask_size() -> Prompt:
    p = Prompt()
    return saved(p, p.out(masks_node(p, count=1, source="masks (one per identity)", masks=solid(p, 2 * SIZE, SIZE)), 2))


# --- the matrix ------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    prompt: Callable[[], Prompt]
    starts: str              # the node (and input) the message starts with
    names: str               # the input or value the message names
    fix: str                 # what it says to do
    reported: str | None = None   # the node type the host reports it against, where not the IDFusion node


CASES = [
    Case("no face", lambda: detect_prompt("idf_bad_astronaut.png"), "IDFusionFaceDetect: image 0 of the batch",
         "has no face with score >= 0.5", "set no_face to 'skip'"),
    Case("several faces, index past them",
         lambda: detect_prompt("idf_bad_two_faces.png", selection="by_index", index=2),
         "IDFusionFaceDetect: image 0 of the batch", "no face at index 2", "lower index"),
    Case("several faces, fewer than count", faces_count, "IDFusionMultiIDMasks: image 0 of 'faces'", "'count' is 3",
         "lower count"),
    Case("tiny image", lambda: detect_prompt("idf_bad_tiny.png"), "IDFusionFaceDetect: image 0 of the batch",
         "is 24x16 pixels", "use a larger image"),
    Case("1×1 reference crop", tiny_crop, "IDFusionFaceFeatures: 'images'", "is 1×1 pixels (w×h)",
         "connect face crops"),
    Case("mixed sizes: masks of another aspect ratio", wrong_mask_size, "IDFusionMultiIDMasks: 'masks'",
         "is 128×64 (w×h) but the image being generated is 64×64",
         "give masks of the size set by 'width' and 'height'"),
    Case("mixed sizes: identity masks at sampling", region_masks_at_sampling,
         "IDFusion Reference Attention: 'identity_masks'", "is 128×64 (w×h) but the image being generated is 64×64",
         "set the width and height of 'IDFusion Multi-ID Masks' to the image size", reported="KSampler"),
    Case("mixed sizes: position mask at sampling", position_mask_at_sampling,
         "IDFusion Reference Attention: 'position_mask'", "is 128×64 (w×h) but the image being generated is 64×64",
         "make the face position mask at the image size", reported="KSampler"),
    Case("mask count: masks vs count", wrong_mask_count, "IDFusionMultiIDMasks: 'masks'",
         "holds 1 mask(s) but 'count' is 2", "set count to 1"),
    Case("mask count: regions vs identities", region_count, "IDFusionReferenceAttention: 'identity_masks'",
         "has 2 region(s) but 'features' has 1 identity", "give one mask per identity"),
    Case("SD1.5 features on an SDXL MODEL", sd15_on_sdxl, "IDFusionReferenceAttention: 'features'",
         "encoded for an SD1.5 model", "connect this SDXL MODEL to 'IDFusion ReferenceNet Loader'"),
    Case("SDXL features on an SD1.5 MODEL", sdxl_on_sd15, "IDFusionFusedKV: 'features'",
         "encoded for an SDXL model", "connect this SD1.5 MODEL to 'IDFusion ReferenceNet Loader'"),
    Case("plain UNet features on FlashFace's MODEL", plain_on_flashface, "IDFusionReferenceAttention: 'features'",
         "'model' is FlashFace's MODEL (5 input channels)", "encode the features with the REFERENCE_NET"),
    Case("FlashFace features on a plain MODEL", flashface_on_plain, "IDFusionFusedKV: 'features'",
         "'model' is not the FlashFace MODEL", "connect that loader's MODEL output to 'model'"),
    Case("wrong file: a LoRA as FlashFace weights", lambda: flashface_file("idf-bad-lora.safetensors"),
         "IDFusionReferenceNetLoader: 'weights'", "is not a FlashFace checkpoint", "Put the official flashface.ckpt"),
    Case("damaged file: FlashFace .ckpt", lambda: flashface_file("idf-bad-damaged.ckpt"),
         "IDFusionReferenceNetLoader: 'weights'", "idf-bad-damaged.ckpt is damaged", "download (or copy) it again"),
    Case("wrong file: adapter keys", lambda: adapter("idf-bad-wrong-keys.safetensors"), "IDFusionFusedKV: 'adapter'",
         "lacks", "choose blocks the adapter covers"),
    Case("damaged file: adapter", lambda: adapter("idf-bad-damaged.safetensors"), "IDFusionFusedKV: 'adapter'",
         "idf-bad-damaged.safetensors is damaged", "download (or copy) it again"),
    Case("wrong file: parsing weights", lambda: parsing("parsing_idf_bad_wrong.pth"),
         "IDFusionFaceParsingLoader: 'model'",
         "is not a facexlib BiSeNet face-parsing model", "use facexlib's parsing_bisenet.pth"),
    Case("damaged file: parsing weights", lambda: parsing("parsing_idf_bad_damaged.pth"),
         "IDFusionFaceParsingLoader: 'model'", "parsing_idf_bad_damaged.pth is damaged", "download (or copy) it again"),
    Case("wrong files: a face pack without a detector", lambda: detect_prompt(PHOTO, pack="idf_bad_no_detector"),
         "IDFusionFaceAnalysisLoader: 'pack'", "has no detection model", "put the pack's files"),
    Case("damaged file: a face pack", lambda: detect_prompt(PHOTO, pack="idf_bad_damaged"),
         "IDFusionFaceAnalysisLoader: 'pack'", "glintr100.onnx is damaged", "put the pack's files"),
]


def normal_prompt() -> Prompt:
    """FlashFace reference attention on the small FlashFace UNet (the checkpoint's CLIP and VAE)."""
    return prompts.reference_prompt("idf_bad_then_normal", flashface=flashface_name())


@pytest.fixture(scope="module")
def fresh_picture(fresh_server, files):
    entry = fresh_server.run(normal_prompt())
    assert execution_error(entry) is None, execution_error(entry)
    picture = prompts.pixels(fresh_server, entry)
    fresh_server.free()                  # its models' memory back, while the matrix runs on the other server
    return picture


@pytest.fixture(scope="module")
def messages(artifacts):
    found = {}
    yield found
    lines = ["# Bad-input messages (tests/e2e/test_bad_inputs.py)", ""]
    lines += [f"- **{case}** (reported against {node}): `{message}`" for case, (node, message) in found.items()]
    (artifacts / "bad-input-messages.md").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named_at_its_node_and_the_server_keeps_serving(server, files, fresh_picture, messages, case):
    entry = server.run(case.prompt(), timeout=900)
    failure = execution_failure(entry)
    assert failure is not None, f"{case.id}: the prompt succeeded"
    node, message = failure
    messages[case.id] = failure
    assert message.startswith(case.starts), message
    assert case.names in message and case.fix in message, message
    if case.reported is not None:
        assert node == case.reported
    else:
        assert case.starts.startswith(node + ":"), f"reported against {node}: {message}"
    after = server.run(normal_prompt(), timeout=900)
    assert execution_error(after) is None, execution_error(after)
    assert np.array_equal(prompts.pixels(server, after), fresh_picture)


def test_rgba_reference_crops_are_composited_and_accepted(server, files):
    p = Prompt()
    ckpt = prompts.checkpoint(p)
    loader = p.add("IDFusionReferenceNetLoader", model=p.out(ckpt), weights=flashface_name())
    image = p.add("LoadImage", image=PHOTO)
    rgba = p.add("JoinImageWithAlpha", image=p.out(image), alpha=solid(p, 192, 224, value=0.0))    # opaque
    feats = prompts.features(p, p.out(loader, 1), ckpt, p.out(rgba))
    prompts.sample_and_save(p, p.out(prompts.reference_attention(p, p.out(loader), p.out(feats))), ckpt, "idf_rgba")
    entry = server.run(p, timeout=900)
    assert execution_error(entry) is None, execution_error(entry)
    assert prompts.pixels(server, entry).shape == (SIZE, SIZE, 3)
