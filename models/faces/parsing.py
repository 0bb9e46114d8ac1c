"""Face parsing with facexlib's BiSeNet: 19 CelebAMask-HQ labels per pixel, region masks and a
colour preview. Weights come from ComfyUI's ``facexlib`` model folder (``parsing_bisenet.pth``
is the file facexlib itself uses); the network runs under the host's memory management.

facexlib is imported by ``load_parser`` only.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .analysis import ensure_model_folder

logger = logging.getLogger("IDFusion")

LABELS = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r", "nose",
          "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
#: The grouped regions the parsing node outputs (label ids).
REGIONS = {
    "skin": (1,),
    "brows": (2, 3),
    "eyes": (4, 5),
    "ears": (7, 8),
    "nose": (10,),
    "mouth": (11, 12, 13),
    "hair": (17,),
    "face": (1, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13),
}
PALETTE = torch.tensor([
    [0, 0, 0], [204, 153, 102], [102, 51, 0], [153, 76, 0], [0, 102, 255], [0, 153, 255], [255, 255, 0],
    [255, 102, 153], [255, 51, 102], [255, 215, 0], [255, 128, 0], [204, 0, 0], [255, 51, 51], [153, 0, 51],
    [0, 204, 102], [0, 153, 153], [102, 102, 204], [102, 0, 153], [0, 255, 255]], dtype=torch.float32) / 255.0
DEFAULT_MODEL = "parsing_bisenet.pth"
MODEL_SUFFIXES = (".pth", ".pt", ".safetensors")
INPUT_SIZE = 512
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def model_names() -> list[str]:
    """Weight files in the facexlib model folder(s), plus facexlib's own file name."""
    names = {DEFAULT_MODEL}
    for base in ensure_model_folder("facexlib"):
        folder = Path(base)
        if folder.is_dir():
            names.update(p.name for p in folder.iterdir()
                         if p.suffix in MODEL_SUFFIXES and ("parsing" in p.name.lower() or "bisenet" in p.name.lower()))
    return sorted(names)


def find_model(name: str) -> Path:
    bases = ensure_model_folder("facexlib")
    for base in bases:
        path = Path(base) / name
        if path.is_file():
            return path
    places = " or ".join(bases)
    raise FileNotFoundError(f"face parsing weights '{name}' not found: put facexlib's {DEFAULT_MODEL} (BiSeNet, "
                            f"19 labels) in {places}. IDFusion never downloads models")


class FaceParser:
    """A BiSeNet face parser wrapped in a ModelPatcher (the host loads and offloads it)."""

    def __init__(self, patcher, name: str):
        self.patcher, self.name = patcher, name

    def __repr__(self) -> str:
        return f"FaceParser({self.name!r})"

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """One image [H, W, 3] in [0, 1] -> label logits [19, H, W] at the image's size."""
        import comfy.model_management
        comfy.model_management.load_models_gpu([self.patcher])
        device = self.patcher.load_device
        height, width = image.shape[:2]
        x = image[..., :3].movedim(-1, 0)[None].to(device, torch.float32)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        x = (x - x.new_tensor(MEAN).view(1, 3, 1, 1)) / x.new_tensor(STD).view(1, 3, 1, 1)
        out = self.patcher.model(x)[0]
        return F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)[0].float().cpu()

    def parse(self, image: torch.Tensor) -> torch.Tensor:
        """One image [H, W, 3] in [0, 1] -> labels [H, W] (int64, 0..18)."""
        return self.logits(image).argmax(0)


def load_parser(name: str = DEFAULT_MODEL) -> FaceParser:
    """BiSeNet from the facexlib model folder, loaded safely (weights only). ValueError names a
    damaged file or one that is not a BiSeNet."""
    path = find_model(name)
    from facexlib.parsing.bisenet import BiSeNet

    from ..files import WeightFileError, load_state_dict
    from ..host_patcher import wrap
    try:
        state = load_state_dict(path)
    except WeightFileError as error:
        raise ValueError(f"{error}. It belongs in {path.parent}: facexlib's {DEFAULT_MODEL}") from error
    model = BiSeNet(num_class=len(LABELS))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path.name} is not a facexlib BiSeNet face-parsing model with {len(LABELS)} labels: it "
                         f"lacks {len(missing)} of its {len(expected)} tensors (e.g. {missing[:3]}) and has "
                         f"{len(unexpected)} it does not know (e.g. {unexpected[:3]}); use facexlib's {DEFAULT_MODEL}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path.name} is not a facexlib BiSeNet face-parsing model with {len(LABELS)} labels: "
                         f"{str(error).splitlines()[-1].strip()}; use facexlib's {DEFAULT_MODEL}") from error
    patcher = wrap(model.requires_grad_(False))
    logger.info("IDFusion face parsing loaded from %s", path)
    return FaceParser(patcher, name)


def parse_label_list(text: str) -> tuple[int, ...]:
    """'hair, 4, l_lip' -> label ids. Names are those of ``LABELS``; ValueError names the bad entry."""
    ids = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.isdigit() and int(item) < len(LABELS):
            ids.append(int(item))
        elif item in LABELS:
            ids.append(LABELS.index(item))
        else:
            raise ValueError(f"'{item}' is not a face-parsing label: use numbers 0-{len(LABELS) - 1} or names "
                             f"({', '.join(LABELS)})")
    return tuple(ids)


def region_masks(labels: torch.Tensor, ids) -> torch.Tensor:
    """labels [B, H, W] -> MASK [B, H, W] float: 1 where the label is one of ``ids``."""
    return torch.isin(labels, torch.tensor(list(ids), dtype=labels.dtype)).float()


def colorize(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, H, W] -> IMAGE [B, H, W, 3] in the parsing palette."""
    return PALETTE[labels]
