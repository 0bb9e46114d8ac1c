"""ConsistentID's face side: one photo → ID tokens and facial-region vectors, as the official
pipeline makes them (``pipline_StableDiffusion_ConsistentID.py``), cached by content.

- ArcFace: insightface ``buffalo_l``'s embedding of the highest-scoring face. The official
  inference feeds insightface the RGB array where insightface expects BGR (training fed BGR):
  ``ARCFACE_RGB`` reproduces that, ``ARCFACE_BGR`` is insightface's own convention.
- Parsing: the whole photo squashed to 512 × 512 (PIL bilinear), ImageNet-normalised, BiSeNet
  (19 CelebAMask-HQ labels), argmax. Per label the mask is its external contours, filled.
  Regions, first present label per group, in label order: Face (skin 1), Eye (4, else 5),
  Ear (7, else 8), Nose (10), Lip (12, else 13).
- Region images: each mask resized to the photo (PIL bicubic), the photo composited over black.
- CLIP: penultimate states of ComfyUI's CLIP vision model (``encode_image``, centre crop) for the
  whole photo and each region image; the unconditional inputs are all-zero pixel values.
- ID tokens = image_proj(ArcFace, CLIP(photo)); unconditional = image_proj(0, CLIP(zeros)).
  Region vectors = FacialEncoder.visual_projection(CLIP(region)); unconditional from CLIP(zeros).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..references import Shared
from .weights import ConsistentIDWeights

logger = logging.getLogger("IDFusion")

ARCFACE_RGB = "RGB (official inference)"
ARCFACE_BGR = "BGR (insightface convention, as trained)"
ARCFACE_ORDERS = (ARCFACE_RGB, ARCFACE_BGR)
NO_FACE_ERROR = "error"
NO_FACE_ZEROS = "zero embedding (official)"
NO_FACE_CHOICES = (NO_FACE_ERROR, NO_FACE_ZEROS)
#: ConsistentID's regions: (name, BiSeNet labels, the first present one wins), in the official order.
REGIONS = (("Face", (1,)), ("Eye", (4, 5)), ("Ear", (7, 8)), ("Nose", (10,)), ("Lip", (12, 13)))
PARSE_SIZE = 512
MIN_SCORE = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PALETTE = np.array([[230, 80, 60], [60, 140, 230], [80, 200, 90], [240, 200, 40], [190, 80, 220]], dtype=np.float32)


@dataclass(frozen=True, eq=False)
class ConsistentIDFace(Shared):
    """One person's ConsistentID encoding (CPU, float32).

    arcface [512]; clip_states [N, W] (whole photo, penultimate); regions: the names present, in
    region order; region_vectors [R, C]; uncond_vector [C]; id_tokens / uncond_id_tokens [T, C].
    """

    label: str
    weights_digest: str
    arcface: torch.Tensor
    clip_states: torch.Tensor
    regions: tuple
    region_vectors: torch.Tensor
    uncond_vector: torch.Tensor
    id_tokens: torch.Tensor
    uncond_id_tokens: torch.Tensor


@dataclass(frozen=True, eq=False)
class ConsistentIDFaces(Shared):
    """One or more encoded people on one ConsistentID file, with mixing weights."""

    weights: ConsistentIDWeights
    faces: tuple
    mix_weights: tuple

    def __post_init__(self):
        if not self.faces or len(self.faces) != len(self.mix_weights):
            raise ValueError(f"{len(self.faces)} faces but {len(self.mix_weights)} weights")

    @property
    def count(self) -> int:
        return len(self.faces)

    def mix(self) -> torch.Tensor:
        """Weights normalised to sum 1: [M]."""
        w = torch.tensor(self.mix_weights, dtype=torch.float32)
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"identity weights must be >= 0 and not all 0, got {list(self.mix_weights)}")
        return w / w.sum()


# --- parsing and region images ---------------------------------------------------------------------

def parse_labels(parser, rgb: np.ndarray) -> np.ndarray:
    """BiSeNet labels [512, 512] uint8 of an RGB uint8 photo, preprocessed as the official code does."""
    import comfy.model_management
    from PIL import Image
    comfy.model_management.load_models_gpu([parser.patcher])
    resized = np.asarray(Image.fromarray(rgb).resize((PARSE_SIZE, PARSE_SIZE), Image.BILINEAR), dtype=np.float32)
    x = torch.from_numpy(resized / 255.0).movedim(-1, 0)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    model = parser.patcher.model
    param = next(model.parameters())
    out = model(x[None].to(param.device, param.dtype))[0]
    return out[0].float().argmax(0).to(torch.uint8).cpu().numpy()


def filled_mask(labels: np.ndarray, value: int) -> np.ndarray:
    """[H, W] uint8 {0, 255}: the external contours of the pixels labelled ``value``, filled."""
    import cv2
    binary = np.uint8(labels == value) * 255
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros_like(binary)
    cv2.drawContours(mask, contours, -1, 255, thickness=cv2.FILLED)
    return mask


def region_masks(labels: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """[(region name, mask [512, 512] uint8)] for the regions present, in the official order."""
    present = set(np.unique(labels).tolist())
    found = []
    for name, candidates in REGIONS:
        label = next((c for c in candidates if c in present), None)
        if label is not None:
            found.append((name, filled_mask(labels, label)))
    return found


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 512² mask at the photo's size (w, h), PIL bicubic, uint8."""
    from PIL import Image
    return np.asarray(Image.fromarray(mask).resize(size, Image.BICUBIC))


def composite(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photo over black through a mask at its size (PIL ``Image.composite``), uint8 [H, W, 3]."""
    from PIL import Image
    photo = Image.fromarray(rgb)
    black = Image.new("RGB", photo.size, (0, 0, 0))
    return np.asarray(Image.composite(photo, black, Image.fromarray(mask)))


def preview(rgb: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """The photo with each region tinted in its colour: float32 [H, W, 3] in [0, 1]."""
    out = rgb.astype(np.float32)
    for i, mask in enumerate(masks):
        alpha = 0.55 * (mask.astype(np.float32) / 255.0)[..., None]
        out = out * (1 - alpha) + PALETTE[i % len(PALETTE)] * alpha
    return out / 255.0


# --- CLIP vision and ArcFace ------------------------------------------------------------------------

def clip_states(clip_vision, images: np.ndarray) -> torch.Tensor:
    """Penultimate CLIP vision states [N, 257, W] of uint8 images [N, H, W, 3] (ComfyUI preprocessing)."""
    pixels = torch.from_numpy(images).float() / 255.0
    return clip_vision.encode_image(pixels, crop=True)["penultimate_hidden_states"].float().cpu()


def zero_states(clip_vision) -> torch.Tensor:
    """Penultimate CLIP vision states [1, 257, W] of all-zero pixel values (the unconditional input)."""
    import comfy.model_management
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    zeros = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    return clip_vision.model(pixel_values=zeros, intermediate_output=-2)[1].float().cpu()


def arcface_embedding(analyzer, rgb: np.ndarray, order: str) -> np.ndarray | None:
    """The normalised ArcFace embedding [512] of the highest-scoring face, or None."""
    if order not in ARCFACE_ORDERS:
        raise ValueError(f"arcface_input must be one of {', '.join(ARCFACE_ORDERS)}, got {order!r}")
    image = np.ascontiguousarray(rgb[:, :, ::-1]) if order == ARCFACE_RGB else rgb   # detect() swaps to BGR
    faces = [f for f in analyzer.detect(image, MIN_SCORE) if f.embedding is not None]
    if not faces:
        return None
    return max(faces, key=lambda f: f.score).embedding


# --- the encoding ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoded:
    face: ConsistentIDFace
    preview: torch.Tensor       # [1, H, W, 3]
    crops: torch.Tensor         # [R, H, W, 3]: the region images CLIP saw


def encode(weights: ConsistentIDWeights, clip_vision, analyzer, parser, rgb: np.ndarray, label: str,
           arcface_order: str, no_face: str, node: str) -> Encoded:
    """A photo (RGB uint8 [H, W, 3]) → its ConsistentID encoding; errors name ``node``."""
    embedding = arcface_embedding(analyzer, rgb, arcface_order)
    if embedding is None:
        if no_face != NO_FACE_ZEROS:
            raise ValueError(f"{node}: 'image' has no face with score >= {MIN_SCORE} for ArcFace; use a clearer photo "
                             f"of one person, or set no_face to '{NO_FACE_ZEROS}'")
        logger.warning("%s: no face in '%s'; ArcFace embedding set to zeros (as the official code does)", node, label)
        embedding = np.zeros(512, dtype=np.float32)
    regions = region_masks(parse_labels(parser, rgb))
    if not regions:
        raise ValueError(f"{node}: face parsing found none of ConsistentID's regions (skin, eyes, ears, nose, lips) in "
                         f"'image'; use a photo where the face is large and frontal, and facexlib's "
                         f"parsing_bisenet.pth or ConsistentID's face_parsing.pth as the parser")
    size = (rgb.shape[1], rgb.shape[0])
    masks = [resized_mask(mask, size) for _, mask in regions]
    crops = np.stack([composite(rgb, mask) for mask in masks])
    whole = clip_states(clip_vision, rgb[None])
    if whole.shape[-1] != weights.clip_width:
        raise ValueError(f"{node}: 'clip_vision' gives {whole.shape[-1]}-wide states but {weights.name} expects "
                         f"{weights.clip_width} (CLIP-ViT-H-14 laion2B for the releases); load that model with "
                         f"Load CLIP Vision")
    region_states = clip_states(clip_vision, crops)
    zeros = zero_states(clip_vision)
    modules = weights.loaded_encoders()
    param = next(modules.parameters())
    to = dict(device=param.device, dtype=param.dtype)
    arcface = torch.from_numpy(np.asarray(embedding, dtype=np.float32))
    with torch.no_grad():
        vectors = modules.facial_encoder.visual_projection(torch.cat([region_states, zeros]).to(**to)).float().cpu()
        tokens = modules.image_proj(torch.stack([arcface, torch.zeros_like(arcface)]).to(**to),
                                    torch.cat([whole, zeros]).to(**to), shortcut=weights.shortcut).float().cpu()
    face = ConsistentIDFace(label, weights.digest, arcface, whole[0], tuple(n for n, _ in regions), vectors[:-1],
                            vectors[-1], tokens[0], tokens[1])
    logger.info("%s: '%s' encoded: regions %s", node, label, ", ".join(face.regions))
    return Encoded(face, torch.from_numpy(preview(rgb, masks))[None], torch.from_numpy(crops).float() / 255.0)



# --- the content cache ----------------------------------------------------------------------------

def module_fingerprint(module: torch.nn.Module, samples: int = 64) -> str:
    """A stable id of a module's weights: every tensor's name, shape and a strided sample of its values."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}".encode())
        if flat.numel() and (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            h.update(flat[:: max(1, flat.numel() // samples)][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def encoding_key(weights: ConsistentIDWeights, clip_vision, analyzer, parser, rgb: np.ndarray, *options) -> str:
    """What an encoding depends on: the photo's pixels, the four models and the options."""
    h = hashlib.sha256(f"{rgb.shape}|{weights.digest}|{options}".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    h.update(module_fingerprint(clip_vision.model).encode())
    h.update(module_fingerprint(parser.patcher.model).encode())
    h.update(f"{analyzer.name}|{analyzer.folder}|{analyzer.det_size}".encode())
    return h.hexdigest()


class EncodingCache:
    """LRU of encodings by content, with counters (``encodings``: computed, ``hits``: served)."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._entries: OrderedDict[str, Encoded] = OrderedDict()
        self._lock = threading.Lock()
        self.counters = dict(encodings=0, hits=0)

    def get_or_encode(self, key: str, make) -> Encoded:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.counters["hits"] += 1
                return self._entries[key]
        value = make()
        with self._lock:
            self.counters["encodings"] += 1
            self._entries[key] = value
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()
            self.counters = dict.fromkeys(self.counters, 0)

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counters, entries=len(self._entries))


ENCODINGS = EncodingCache()


def encode_cached(weights, clip_vision, analyzer, parser, rgb, label, arcface_order, no_face, node) -> Encoded:
    """``encode`` through ``ENCODINGS``: the same photo, models and options are encoded once."""
    key = encoding_key(weights, clip_vision, analyzer, parser, rgb, label, arcface_order, no_face)
    return ENCODINGS.get_or_encode(key, lambda: encode(weights, clip_vision, analyzer, parser, rgb, label,
                                                       arcface_order, no_face, node))
