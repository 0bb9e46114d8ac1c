"""Face analysis with insightface: model packs from ComfyUI's ``insightface`` folder, the
execution provider, detections as plain data, and the crops and position masks the
methods need (FlashFace's levelled raw box, ArcFace's 112 alignment, FlashFace's
box-to-square position mask).

insightface, onnxruntime and cv2 are imported inside the functions that run them, never at
import time.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .landmarks import similarity_transform

logger = logging.getLogger("IDFusion")

#: The real file names of the packs people download (``models/insightface/models/<pack>/``).
PACK_FILES = {
    "antelopev2": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"),
    "buffalo_l": ("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx"),
}
#: The models IDFusion runs (insightface's task names); gender/age is never loaded.
TASKS = ("detection", "recognition", "landmark_3d_68", "landmark_2d_106")
PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "DirectML": "DmlExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *PROVIDERS)
#: ArcFace's five-point template in its 112 x 112 crop (eyes, nose tip, mouth corners).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])
MIN_IMAGE_SIDE = 32
#: The smallest reference crop that can hold a face (pixels on each side).
MIN_CROP_SIDE = 32
SELECTIONS = ("largest", "left_to_right", "by_index", "all")


# --- model folders and packs --------------------------------------------------------------------

def ensure_model_folder(name: str) -> list[str]:
    """Register ``models/<name>`` with folder_paths if the host does not know the folder; its paths."""
    import folder_paths
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
    return folder_paths.get_folder_paths(name)


def pack_names() -> list[str]:
    """Packs found under ``<insightface folder>/models/``, plus the two well-known names."""
    names = set(PACK_FILES)
    for base in ensure_model_folder("insightface"):
        packs = Path(base) / "models"
        if packs.is_dir():
            names.update(p.name for p in packs.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(names)


def _pack_help(name: str, bases: list[str]) -> str:
    files = ", ".join(PACK_FILES.get(name, ("a detection model such as scrfd_10g_bnkps.onnx or det_10g.onnx",
                                            "a recognition model such as glintr100.onnx")))
    places = " or ".join(str(Path(b) / "models" / name) for b in bases)
    return (f"put the pack's files ({files}) directly in {places}. "
            "IDFusion never downloads models: get the pack from insightface's releases yourself")


def find_pack(name: str) -> Path:
    """The folder of pack ``name``; FileNotFoundError (with what to do) if it is missing or nested."""
    bases = ensure_model_folder("insightface")
    for base in bases:
        folder = Path(base) / "models" / name
        if any(folder.glob("*.onnx")):
            return folder
        nested = folder / name
        if any(nested.glob("*.onnx")):
            raise FileNotFoundError(f"insightface pack '{name}' is nested one folder too deep: move the files from "
                                    f"{nested} up into {folder}")
    raise FileNotFoundError(f"insightface pack '{name}' not found: {_pack_help(name, bases)}")


def damaged_pack_file(folder: Path) -> tuple[Path, str] | None:
    """The first .onnx file of a pack that is not a whole ONNX model, and why (None if all are)."""
    import onnx
    from google.protobuf.message import DecodeError
    for file in sorted(folder.glob("*.onnx")):
        if file.stat().st_size == 0:
            return file, "it is empty (0 bytes)"
        try:
            onnx.load_model(str(file), load_external_data=False)
        except (DecodeError, OSError, ValueError) as error:
            return file, f"it is not a complete ONNX model ({str(error).strip().splitlines()[0][:160]})"
    return None


def choose_providers(choice: str, available: list[str]) -> tuple[list[str], str | None]:
    """ONNX Runtime providers for a user's choice, and why the choice could not be met (or None).

    ``auto`` takes the first of CUDA, ROCm, CoreML, DirectML that this onnxruntime offers;
    every list ends with the CPU provider, which always exists.
    """
    if choice not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, got '{choice}'")
    cpu = PROVIDERS["CPU"]
    if choice == "auto":
        wanted = [p for k, p in PROVIDERS.items() if k != "CPU" and p in available]
        return wanted[:1] + [cpu], None
    provider = PROVIDERS[choice]
    if provider == cpu:
        return [cpu], None
    if provider in available:
        return [provider, cpu], None
    return [cpu], (f"{choice} was requested but this onnxruntime offers only {', '.join(available)} "
                   f"(for CUDA install onnxruntime-gpu instead of onnxruntime)")


# --- detections -----------------------------------------------------------------------------------

@dataclass
class Face:
    """One detected face. Coordinates are pixels of the image it was found in.

    bbox: (x1, y1, x2, y2); kps: [5, 2] eyes, nose tip, mouth corners; landmark_2d_106:
    [106, 2]; landmark_3d_68: [68, 3] (x, y pixels, z depth); embedding: [512] L2-normalised;
    pose: (pitch, yaw, roll) degrees from the 3D landmarks.
    """

    bbox: tuple[float, float, float, float]
    score: float
    kps: np.ndarray = field(repr=False)
    image_index: int = 0
    landmark_2d_106: np.ndarray | None = field(default=None, repr=False)
    landmark_3d_68: np.ndarray | None = field(default=None, repr=False)
    embedding: np.ndarray | None = field(default=None, repr=False)
    pose: np.ndarray | None = field(default=None, repr=False)

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


@dataclass(frozen=True, eq=False)
class Faces:
    """Faces of an IMAGE batch and their crops.

    per_image: per image, the selected faces (possibly none).
    sizes:     per image, (height, width).
    crops:     [F, S, S, 3] FlashFace-style crops of all faces, in image order then face order.
    aligned:   [F, 112, 112, 3] ArcFace-aligned crops in the same order.
    """

    per_image: tuple[tuple[Face, ...], ...]
    sizes: tuple[tuple[int, int], ...]
    crops: torch.Tensor
    aligned: torch.Tensor
    _all: list = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return f"Faces({len(self.per_image)} image(s), {self.count} face(s))"

    def for_image(self, index: int) -> list[Face]:
        return list(self.per_image[index])

    @property
    def all(self) -> list[Face]:
        if not self._all:
            self._all.extend(face for faces in self.per_image for face in faces)
        return list(self._all)

    @property
    def count(self) -> int:
        return sum(len(faces) for faces in self.per_image)

    def embeddings(self) -> torch.Tensor | None:
        """[F, 512] normalised embeddings of all faces, or None when any face has none."""
        faces = self.all
        if not faces or any(f.embedding is None for f in faces):
            return None
        return torch.from_numpy(np.stack([f.embedding for f in faces])).float()


class FaceAnalyzer:
    """A loaded insightface pack, with the provider it really runs on."""

    def __init__(self, app, name: str, folder: Path, provider: str, det_size: int):
        self.app, self.name, self.folder, self.provider, self.det_size = app, name, folder, provider, det_size

    def __repr__(self) -> str:
        return f"FaceAnalyzer({self.name!r}, {self.provider}, det_size={self.det_size})"

    def detect(self, rgb: np.ndarray, min_score: float, image_index: int = 0) -> list[Face]:
        """All faces in an RGB uint8 image [H, W, 3] with a score >= min_score, best first."""
        from insightface.app.common import Face as InsightFace
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        detector = self.app.det_model
        detector.det_thresh = min_score  # SCRFD reads its threshold from here in every insightface version
        boxes, kpss = detector.detect(bgr, max_num=0, metric="default")
        faces = []
        for i in range(boxes.shape[0]):
            raw = InsightFace(bbox=boxes[i, :4], kps=None if kpss is None else kpss[i], det_score=boxes[i, 4])
            for task in TASKS[1:]:
                if task in self.app.models and (task != "recognition" or raw.kps is not None):
                    self.app.models[task].get(bgr, raw)
            faces.append(_to_face(raw, image_index))
        return faces


def _to_face(raw, image_index: int) -> Face:
    embedding = raw.embedding
    if embedding is not None:
        embedding = (embedding / max(np.linalg.norm(embedding), 1e-12)).astype(np.float32)
    kps = raw.kps if raw.kps is not None else _box_kps(raw.bbox)
    return Face(bbox=tuple(float(v) for v in raw.bbox), score=float(raw.det_score), kps=np.asarray(kps, np.float64),
                image_index=image_index, landmark_2d_106=raw.landmark_2d_106, landmark_3d_68=raw.landmark_3d_68,
                embedding=embedding, pose=raw.pose)


def _box_kps(bbox) -> np.ndarray:
    """Five keypoints at the ArcFace template's place in a box, for detectors without keypoints."""
    x1, y1, x2, y2 = bbox
    return ARCFACE_TEMPLATE / 112.0 * [x2 - x1, y2 - y1] + [x1, y1]


def import_onnxruntime():
    """onnxruntime, with its telemetry off: it looks up an outside host and writes a device id under
    the home folder when first imported unless ORT_DISABLE_TELEMETRY is set (the pack's
    ``__init__`` sets it when ComfyUI loads the pack; this covers any other way in)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime
    return onnxruntime


def load_analyzer(name: str, provider: str = "auto", det_size: int = 640) -> FaceAnalyzer:
    """Load pack ``name`` from the insightface model folder on the chosen provider (CPU fallback)."""
    folder = find_pack(name)
    onnxruntime = import_onnxruntime()
    from insightface.app import FaceAnalysis
    providers, problem = choose_providers(provider, onnxruntime.get_available_providers())
    try:
        app = FaceAnalysis(name=str(folder), providers=providers, allowed_modules=list(TASKS))
    except AssertionError as error:
        raise FileNotFoundError(f"insightface pack '{name}' in {folder} has no detection model: "
                                f"{_pack_help(name, [str(folder.parent.parent)])}") from error
    except Exception as error:
        damaged = damaged_pack_file(folder)
        if damaged is None:
            raise
        file, reason = damaged
        raise ValueError(f"insightface pack '{name}': {file.name} is damaged: {reason}; the file is truncated or "
                         f"corrupt; {_pack_help(name, [str(folder.parent.parent)])}") from error
    app.prepare(ctx_id=0, det_size=(det_size, det_size))
    running = app.det_model.session.get_providers()[0]
    missing = [t for t in TASKS[1:] if t not in app.models]
    logger.info("IDFusion face analysis '%s' runs on %s%s%s", name, running,
                f" ({problem})" if problem else "",
                f"; this pack has no {', '.join(missing)} model" if missing else "")
    return FaceAnalyzer(app, name, folder, running, det_size)


# --- images, selection, crops, masks ------------------------------------------------------------

def to_rgb_uint8(image: torch.Tensor, label: str) -> np.ndarray:
    """One ComfyUI image [H, W, C] (C = 1, 3 or 4; alpha dropped) or [H, W] -> RGB uint8 [H, W, 3]."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{label} must be an image with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"{label} is {width}x{height} pixels; face detection needs at least "
                         f"{MIN_IMAGE_SIDE} pixels on each side: use a larger image")
    rgb = image[..., :3] if image.shape[-1] != 1 else image.expand(-1, -1, 3)
    return (rgb.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def select_faces(faces: list[Face], selection: str, index: int = 0) -> list[Face]:
    """Pick faces: the largest one, all left to right, the index-th from the left, or all (best first)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got '{selection}'")
    if selection == "all" or not faces:
        return list(faces)
    if selection == "largest":
        return [max(faces, key=lambda f: f.area)]
    ordered = sorted(faces, key=lambda f: (f.bbox[0] + f.bbox[2]) / 2)
    if selection == "left_to_right":
        return ordered
    return ordered[index:index + 1]


def expand_box(bbox, margin: float) -> tuple[float, float, float, float]:
    """The box grown by ``margin`` times its width/height on each side."""
    x1, y1, x2, y2 = bbox
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    return x1 - dx, y1 - dy, x2 + dx, y2 + dy


def flashface_rotation(kps: np.ndarray) -> float:
    """Degrees (counter-clockwise, PIL's ``rotate``) that level the eyes of a crop, computed as the
    official ``crop_face`` does: from the triangle of the two eyes and the corner below/beside them."""
    left, right = np.asarray(kps[0], np.float64), np.asarray(kps[1], np.float64)
    if left[1] > right[1]:
        third, direction = np.array([right[0], left[1]]), -1
    else:
        third, direction = np.array([left[0], right[1]]), 1
    a, b, c = (float(np.linalg.norm(u - w)) for u, w in ((left, third), (right, third), (right, left)))
    if b == 0 or c == 0:
        return 0.0
    angle = math.degrees(math.acos(min(1.0, max(-1.0, (b * b + c * c - a * a) / (2 * b * c)))))
    return direction * (90 - angle if direction == -1 else angle)


def pad_to_square_pil(image, size: int):
    """FlashFace's PadToSquare on a PIL image: the longer side scaled to ``size`` with PIL's
    (bicubic, anti-aliased) resize, centred on black."""
    from PIL import Image
    scale = size / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((width, height), Image.BICUBIC)
    square = Image.new(image.mode, (size, size))
    square.paste(resized, ((size - width) // 2, (size - height) // 2))
    return square


def flashface_crop(image: np.ndarray, bbox, kps: np.ndarray, size: int = 224, margin: float = 0.0) -> np.ndarray:
    """FlashFace's reference crop [size, size, 3] (float, 0–1) of a float image [H, W, 3] (0–1).

    As the official code does it, with PIL on the 8-bit image: the box (grown by ``margin``),
    rounded, is cut out (outside the image: black), turned about its centre to level the eyes
    (nearest neighbour, black corners), then padded to a square with black and resized with
    PIL's bicubic resampling, which averages (anti-aliases) when it shrinks.
    """
    from PIL import Image
    pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    box = tuple(int(v) for v in np.round(np.asarray(expand_box(bbox, margin), np.float64)))
    crop = Image.fromarray(np.ascontiguousarray(pixels)).crop(box)
    angle = flashface_rotation(kps)
    if angle:
        crop = crop.rotate(angle)
    return np.asarray(pad_to_square_pil(crop, size), np.float32) / 255.0


def arcface_transform(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """2x3 similarity from image to ArcFace crop coordinates (the template scaled to ``size``)."""
    scale, rotation, translation = similarity_transform(kps, ARCFACE_TEMPLATE * (size / 112.0))
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def arcface_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """ArcFace-aligned crop [size, size, 3] of a float image [H, W, 3] (insightface's norm_crop)."""
    import cv2
    return cv2.warpAffine(image, arcface_transform(kps, size), (size, size), borderValue=(0, 0, 0))


def face_crops(images: torch.Tensor, label: str) -> torch.Tensor:
    """Face crops [N, H, W, C] (C = 1, 3 or 4) as RGB [N, H, W, 3]: grayscale repeated, RGBA
    composited on black (transparent is black, like FlashFace's padding). ValueError, starting with
    ``label``, for crops too small to hold a face."""
    height, width = images.shape[1:3]
    if min(height, width) < MIN_CROP_SIDE:
        raise ValueError(f"{label} is {width}×{height} pixels (w×h); a face crop needs at least {MIN_CROP_SIDE} "
                         f"pixels on each side: connect face crops, e.g. the 'crops' output of 'IDFusion Face Detect'")
    images = images.float()
    if images.shape[-1] == 1:
        return images.expand(-1, -1, -1, 3)
    if images.shape[-1] == 4:
        return images[..., :3] * images[..., 3:].clamp(0, 1)
    return images


def pad_to_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """FlashFace's PadToSquare for a batch [N, H, W, C] (C = 1, 3 or 4): scale the longer side to
    ``size`` (bicubic, anti-aliased: PIL's resampling, up to its 8-bit rounding; exact at the same
    size), centre on black. Returns [N, size, size, 3]."""
    import torch.nn.functional as F
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE batch [N, H, W, 1|3|4], got shape {tuple(images.shape)}")
    rgb = images[..., :3].expand(-1, -1, -1, 3).float()
    height, width = rgb.shape[1:3]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = rgb.movedim(-1, 1)
    if (new_h, new_w) != (height, width):
        resized = F.interpolate(resized, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    resized = resized.movedim(1, -1).clamp(0, 1)
    out = rgb.new_zeros(rgb.shape[0], size, size, 3)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[:, top:top + new_h, left:left + new_w] = resized
    return out


def mean_face() -> np.ndarray:
    """insightface's 3D mean face [68, 3] (``meanshape_68.pkl``; x right, y down, z to the viewer)."""
    from insightface.data import get_object
    return np.asarray(get_object("meanshape_68.pkl"), dtype=np.float64)


def position_mask_from_box(box, height: int, width: int) -> torch.Tensor:
    """FlashFace's face position mask [H, W], as the official demo makes it: each box coordinate
    truncated to an integer, then a square of side max(w, h) anchored at (x1, y1), clipped to
    the image; 1 inside, 0 outside."""
    x1, y1, x2, y2 = (int(float(v)) for v in box)
    side = max(x2 - x1, y2 - y1)
    mask = torch.zeros(height, width)
    mask[max(y1, 0):max(min(y1 + side, height), 0), max(x1, 0):max(min(x1 + side, width), 0)] = 1.0
    return mask


def position_masks(faces: Faces) -> torch.Tensor:
    """[B, H, W] per image: the union of its faces' position squares."""
    masks = []
    for (height, width), image_faces in zip(faces.sizes, faces.per_image):
        mask = torch.zeros(height, width)
        for face in image_faces:
            mask = torch.maximum(mask, position_mask_from_box(face.bbox, height, width))
        masks.append(mask)
    return torch.stack(masks)


def draw_faces(image: np.ndarray, faces: list[Face]) -> np.ndarray:
    """A preview: boxes (green), position squares (blue), keypoints (red) and scores on RGB uint8."""
    import cv2
    out = np.ascontiguousarray(image.copy())
    thickness = max(1, round(min(out.shape[:2]) / 256))
    for face in faces:
        x1, y1, x2, y2 = (int(v) for v in face.bbox)
        side = max(x2 - x1, y2 - y1)
        cv2.rectangle(out, (x1, y1), (x1 + side, y1 + side), (60, 120, 255), thickness)
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        for x, y in face.kps:
            cv2.circle(out, (int(round(x)), int(round(y))), 2 * thickness, (255, 0, 0), -1)
        cv2.putText(out, f"{face.score:.2f}", (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thickness, (0, 255, 0), thickness)
    return out
