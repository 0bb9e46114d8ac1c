"""A test server made ready to run the example workflows exactly as shipped.

* Models: the fixtures (random weights in the real layouts) linked under the file names the
  workflows name: a checkpoint → the full-size random SD1.5 checkpoint; a FlashFace file → the
  small FlashFace checkpoint (CLIP-L width) in that file's format; a ControlNet → the random SD1.5
  ControlNet; an insightface pack → the synthetic pack built under that name.
* Photos: marker photos standing in for the sample photos, under the sample photos' names
  (the synthetic face detector finds faces only in markers, never in real photos).
* DiT text encoders: T5-XXL and Qwen3 cannot be built here; a random CLIP-L stands in (``finish``).
* Affordable values: what a 2-core test host runs instead of the shipped sizes and steps
  (64-px images, 2 steps, 64-px reference crops, a 320-px detector input for the marker faces).
  The e2e tier applies them while converting a workflow; the browser tier applies them to the
  prompt the frontend sends when Run is pressed (see tests/browser/test_templates.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import face_fixtures as faces
from .paths import CACHE
from .workflows import TEST_CROP_SIZE, TEST_IMAGE_SIZE

#: Widget inputs naming a model file, (node type or None for any, input) → the model folder it lives in.
MODEL_INPUTS = {
    (None, "ckpt_name"): "checkpoints",
    ("IDFusionReferenceNetLoader", "weights"): "flashface",
    (None, "control_net_name"): "controlnet",
    ("IDFusionConsistentIDLoader", "weights"): "consistentid",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("IDFusionFaceParsingLoader", "model"): "facexlib",
    (None, "unet_name"): "diffusion_models",
    (None, "vae_name"): "vae",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
}
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
#: The detector input size at which the marker faces of ``stand_ins`` are found.
TEST_DET_SIZE = 320
TEST_STEPS = 2


def model_files(prompts: list[dict]) -> set[tuple[str, str]]:
    """(model folder, file name) of every model file the API prompts name; packs as ("insightface", name)."""
    found = set()
    for prompt in prompts:
        for node in prompt.values():
            for name, value in node["inputs"].items():
                folder = MODEL_INPUTS.get((node["class_type"], name), MODEL_INPUTS.get((None, name)))
                if folder is not None and isinstance(value, str) and value.endswith(MODEL_SUFFIXES):
                    found.add((folder, value))
                if node["class_type"] == "IDFusionFaceAnalysisLoader" and name == "pack":
                    found.add(("insightface", value))
    return found


def fixture_for(folder: str, name: str) -> Path:
    """The fixture file (or pack folder) to serve as ``folder/name``."""
    from . import consistentid_fixtures as cid
    from . import dit_fixtures as dit
    from .flashface_fixtures import write_tiny_checkpoint_for_sd15_clip
    from .models import sd15_checkpoint
    suffix = Path(name).suffix
    if folder == "checkpoints" and suffix == ".safetensors":
        return sd15_checkpoint()
    if folder == "flashface" and suffix in (".ckpt", ".safetensors"):
        return write_tiny_checkpoint_for_sd15_clip(suffix=suffix)
    if folder == "controlnet" and suffix == ".safetensors":
        return faces.sd15_controlnet()
    if folder == "insightface":
        return faces.insightface_pack(name)
    if folder == "consistentid" and name == cid.CHECKPOINT:
        return cid.full_checkpoint()
    if folder == "clip_vision" and name == cid.CLIP_VISION_H:
        return cid.clip_vision_h()
    if folder == "facexlib" and name == cid.PARSER:
        return cid.parsing_weights()
    flux2 = any(tag in name.lower() for tag in ("flux2", "flux-2", "klein"))
    if folder == "diffusion_models":
        return dit.flux2_unet() if flux2 else dit.flux_unet()
    if folder == "vae":
        return dit.flux2_vae() if flux2 else dit.flux_vae()
    if folder == "text_encoders":
        return dit.clip_l()     # stands in for T5/Qwen3 (see ``finish``)
    raise ValueError(f"no test fixture for {folder}/{name}: add one to idf_testlib/prepared.py")


def link_models(prompts: list[dict]) -> dict[str, Path]:
    """Link a fixture under every model file name the prompts use; returns {folder/name: link}."""
    links = {}
    for folder, name in sorted(model_files(prompts)):
        target = fixture_for(folder, name)
        link = target if folder == "insightface" else CACHE / "models" / folder / name
        if link != target and not (link.is_symlink() and link.resolve() == target.resolve()):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        links[f"{folder}/{name}"] = link
    return links


def stand_ins() -> dict[str, np.ndarray]:
    """Marker photos [H, W, 3] uint8 under the names of the sample photos (samples/): person A,
    person B (also the driving pose and the face-swap target, so rolled), the drawn character."""
    return {
        "idfusion_astronaut.png": faces.scene(224, 192, [faces.MarkerFace(100, 110, 62, 82, roll=3)], seed=1),
        "idfusion_grace_hopper.jpg": faces.scene(320, 320, [faces.MarkerFace(160, 150, 90, 120, roll=-15, green=20)],
                                                 seed=7),
        "idfusion_character.png": faces.scene(256, 256, [faces.MarkerFace(128, 120, 84, 108, roll=5)], seed=3),
    }


def place_photos(input_dir: Path) -> list[Path]:
    """Write the stand-ins into a server's input folder (JPEGs at full quality: the marker colour survives)."""
    from PIL import Image
    written = []
    for name, image in stand_ins().items():
        path = Path(input_dir) / name
        Image.fromarray(image).save(path, quality=100, subsampling=0)
        written.append(path)
    return written


def affordable(node_type: str, name: str, value):
    """The value a widget gets on the 2-core test host (``to_api``'s ``overrides``)."""
    if name == "det_size":
        return TEST_DET_SIZE
    if name in ("width", "height"):
        return TEST_IMAGE_SIZE
    if name == "steps":
        return TEST_STEPS
    if name in ("size", "crop_size"):
        return TEST_CROP_SIZE
    if name == "merge_at":
        return 0.2              # ConsistentID in 2 steps: the text-only prompt at step 0, the facial one at step 1
    return value


def finish(prompt: dict) -> dict:
    """What else the test host needs: the DiT workflows' text encoders (T5-XXL, Qwen3), which cannot
    be built on these machines, replaced by a random CLIP-L the test DiTs take (``dit_fixtures``)."""
    from .dit_fixtures import stand_in_text_encoders
    return stand_in_text_encoders(prompt)


def shrink(prompt: dict) -> dict:
    """An API prompt with ``affordable`` applied to every widget value (links stay), ``finish``ed."""
    return finish({key: {**node, "inputs": {name: value if is_link(value) else affordable(node["class_type"], name, value)
                                            for name, value in node["inputs"].items()}}
                   for key, node in prompt.items()})


def is_link(value) -> bool:
    """An API prompt input that is a link: [source node id, output slot]."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], str)
