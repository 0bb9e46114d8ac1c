"""Face-analysis fixtures generated at test time (never committed, never downloaded).

* ``insightface_pack(name)``: a synthetic insightface model pack in the real ``antelopev2``
  or ``buffalo_l`` layout (same file names, same ONNX signatures), built with
  ``onnx.helper`` under ``CACHE/models/insightface/models/<name>``. The real insightface
  code routes, loads and runs it offline.
* ``facexlib_weights()``: random-weight BiSeNet and RetinaFace-R50 state dicts at the file
  names facexlib's own loaders look for, under ``CACHE/models/facexlib``.
* ``MarkerFace`` / ``paint``: synthetic "faces" the synthetic detector finds.

The synthetic detector ("marker detector")
------------------------------------------
A face is a filled rectangle, upright or rotated, painted in marker magenta: red and blue
>= 230, green <= 90. Natural photos do not contain such regions, so the detector finds
nothing in them. Each anchor of the real SCRFD layout (strides 8/16/32, two anchors per
cell) looks at a window of 8 strides around itself and at one of 10 strides, and computes
the marker's moments in the inner window:

* box: the axis-aligned bounds of the rectangle with the window's centroid, its side
  lengths sqrt(12 * eigenvalue) of the covariance and its rotation (exact for a lone,
  solid rectangle);
* score: (share of the marker mass of the 10-stride window that lies in the inner 8-stride
  window)^3 x (1 - 10 x the marker density of the ring between them) x (1 - green / 127.5)
  x (fill of the estimated rectangle)^2 x (1 once the face is 16 px tall in the detector's
  input, less below). A lone solid face scores 1 - green / 127.5: green 0 gives about 1,
  green 51 about 0.6, green 77 about 0.4; windows that cut a face score below 0.1;
* five keypoints: insightface's mean face (``meanshape_68.pkl``) posed by the rectangle.

Faces must be portrait (height >= width), 16 to 200 px tall in the detector input and
apart by at least their height there. The 3D 68-point and 2D 106-point models do the same on
their 192 x 192 crop and place the mean face with the rectangle's centre and roll,
scale sigma = height / 1.6 and a width stretch a = (width / height) / 0.75 (a 3:4 face gives the
mean face); ``MarkerFace.landmarks_3d()`` is that ground truth. The recognition models
project the 14 x 14 average-pooled aligned crop with a fixed random matrix (a different
one per pack), so embeddings depend on content.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .paths import CACHE

FIXTURE_VERSION = "2"
PACK_FILES = {
    "antelopev2": {"1k3d68.onnx": "landmark_3d_68", "2d106det.onnx": "landmark_2d_106", "genderage.onnx": "genderage",
                   "glintr100.onnx": "recognition", "scrfd_10g_bnkps.onnx": "detection"},
    "buffalo_l": {"1k3d68.onnx": "landmark_3d_68", "2d106det.onnx": "landmark_2d_106", "det_10g.onnx": "detection",
                  "genderage.onnx": "genderage", "w600k_r50.onnx": "recognition"},
}
STRIDES = (8, 16, 32)
SIGMA_PER_HEIGHT = 1 / 1.6
MEAN_ASPECT = 0.75
KPS_FROM_68 = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))
MARKER = (255, 0, 255)


def insightface_root() -> Path:
    """The folder registered as ComfyUI's ``insightface`` model folder in tests."""
    return CACHE / "models" / "insightface"


def facexlib_root() -> Path:
    return CACHE / "models" / "facexlib"


def mean_face() -> np.ndarray:
    """insightface's 68-point 3D mean face [68, 3] (x right, y down, z towards the viewer)."""
    from insightface.data import get_object
    return np.asarray(get_object("meanshape_68.pkl"), dtype=np.float64)


def five_from_68(points: np.ndarray) -> np.ndarray:
    """The five keypoints (eye centres, nose tip, mouth corners) of 68 landmarks [68, D] -> [5, D]."""
    return np.stack([points[list(idx)].mean(0) for idx in KPS_FROM_68])


# --- synthetic faces --------------------------------------------------------------------------

@dataclass(frozen=True)
class MarkerFace:
    """A painted synthetic face: a rectangle centred at (cx, cy), ``roll`` degrees clockwise."""

    cx: float
    cy: float
    width: float
    height: float
    roll: float = 0.0
    green: int = 0

    def rotation(self) -> np.ndarray:
        t = math.radians(self.roll)
        return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])

    def corners(self) -> np.ndarray:
        half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [self.width / 2, self.height / 2]
        return half @ self.rotation().T + [self.cx, self.cy]

    def box(self) -> tuple[float, float, float, float]:
        c = self.corners()
        return float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max())

    def score(self) -> float:
        return 1.0 - self.green / 127.5

    def landmarks_3d(self) -> np.ndarray:
        """[68, 3] in image pixels: what the synthetic 3D-68 model reports for this face."""
        sigma = self.height * SIGMA_PER_HEIGHT
        stretch = (self.width / self.height) / MEAN_ASPECT
        shape = mean_face() * [sigma * stretch, sigma, sigma]
        xy = shape[:, :2] @ self.rotation().T + [self.cx, self.cy]
        return np.concatenate([xy, shape[:, 2:]], axis=1)

    def kps(self) -> np.ndarray:
        return five_from_68(self.landmarks_3d()[:, :2])


def canvas(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A textured background [H, W, 3] uint8 that contains no marker colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 90 + 60 * np.sin(xx / 23.0)[..., None] * np.cos(yy / 31.0)[..., None] * [1.0, 0.8, 0.6]
    noise = rng.normal(0, 8, (height, width, 3))
    return np.clip(base + noise + [30, 40, 20], 0, 255).astype(np.uint8)


def paint(image: np.ndarray, face: MarkerFace) -> np.ndarray:
    """Paint ``face`` into a copy of ``image`` [H, W, 3] uint8: pixel centres inside the rectangle."""
    out = image.copy()
    h, w = out.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    rot = face.rotation()
    dx, dy = xx - face.cx, yy - face.cy
    u = rot[0, 0] * dx + rot[1, 0] * dy
    v = rot[0, 1] * dx + rot[1, 1] * dy
    inside = (np.abs(u) < face.width / 2) & (np.abs(v) < face.height / 2)
    out[inside] = (MARKER[0], face.green, MARKER[2])
    return out


def scene(height: int, width: int, faces: list[MarkerFace], seed: int = 0) -> np.ndarray:
    image = canvas(height, width, seed)
    for face in faces:
        image = paint(image, face)
    return image


def astronaut() -> np.ndarray:
    """scikit-image's astronaut (Eileen Collins, public domain) [512, 512, 3] uint8."""
    from skimage import data
    return np.ascontiguousarray(data.astronaut())


def grace_hopper() -> np.ndarray:
    """matplotlib's Grace Hopper portrait (public domain) [600, 512, 3] uint8."""
    from matplotlib import cbook
    from PIL import Image
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB")).copy()


def view_image(server, image: dict):
    """A PIL image a node reported in a history entry, fetched through the server's /view route."""
    import io

    import requests
    from PIL import Image
    params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image["type"]}
    answer = requests.get(server.url + "/view", params=params, timeout=30)
    answer.raise_for_status()
    return Image.open(io.BytesIO(answer.content))


def to_image(*arrays: np.ndarray):
    """uint8 [H, W, C] arrays -> a ComfyUI IMAGE tensor [B, H, W, C] float in [0, 1]."""
    import torch
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


# --- the synthetic insightface pack -----------------------------------------------------------

class _Graph:
    """A small ONNX graph builder: every op has one output, named automatically."""

    def __init__(self):
        self.nodes, self.inits, self._count = [], [], 0

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"idf{self._count}_{kind}"

    def const(self, value) -> str:
        from onnx import numpy_helper
        name = self._name("const")
        array = np.asarray(value)
        array = array.astype(np.int64 if array.dtype.kind in "iu" else np.float32)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        from onnx import helper
        name = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def channel(self, x: str, index: int) -> str:
        return self.op("Slice", x, self.const([index]), self.const([index + 1]), self.const([1]))

    def clip01(self, x: str) -> str:
        return self.op("Clip", x, self.const(0.0), self.const(1.0))

    def affine(self, x: str, scale: float, shift: float) -> str:
        return self.op("Add", self.op("Mul", x, self.const(scale)), self.const(shift))

    def model(self, inputs, outputs, path: Path) -> None:
        import onnx
        from onnx import helper
        graph = helper.make_graph(self.nodes, path.stem, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="idfusion-tests")
        model.ir_version = 8
        onnx.checker.check_model(model)
        tmp = path.with_suffix(".tmp")
        onnx.save(model, str(tmp))
        tmp.rename(path)


def _marker_maps(g: _Graph, x: str) -> tuple[str, str]:
    """Marker mass m and mass times level m*l, each [N, 1, H, W], from normalised RGB input."""
    red, green, blue = (g.channel(x, i) for i in range(3))
    mass = g.op("Mul", g.clip01(g.affine(g.op("Min", red, blue), 20.0, -15.0)),
                g.clip01(g.affine(green, -20.0, -4.0)))
    level = g.clip01(g.affine(green, -128.0 / 127.5, 0.0))
    return mass, g.op("Mul", mass, level)


def _geometry(g: _Graph, mom: list[str], pixel: float) -> dict[str, str]:
    """Centroid, side lengths and roll of a rectangle from its raw moments (A, Sx, Sy, Sxx, Syy, Sxy)."""
    area, sx, sy, sxx, syy, sxy = mom
    safe = g.op("Add", area, g.const(1e-6))
    mx, my = g.op("Div", sx, safe), g.op("Div", sy, safe)
    vx = g.op("Sub", g.op("Div", sxx, safe), g.op("Mul", mx, mx))
    vy = g.op("Sub", g.op("Div", syy, safe), g.op("Mul", my, my))
    cxy = g.op("Sub", g.op("Div", sxy, safe), g.op("Mul", mx, my))
    half_diff = g.op("Mul", g.op("Sub", vy, vx), g.const(0.5))
    radius = g.op("Sqrt", g.op("Add", g.op("Mul", half_diff, half_diff), g.op("Mul", cxy, cxy)))
    mean_var = g.op("Mul", g.op("Add", vx, vy), g.const(0.5))
    major = g.op("Add", mean_var, radius)
    minor = g.op("Relu", g.op("Sub", mean_var, radius))
    height = g.op("Sqrt", g.affine(major, 12.0, pixel * pixel))
    width = g.op("Sqrt", g.affine(minor, 12.0, pixel * pixel))
    cos2 = g.op("Div", g.op("Add", half_diff, g.const(1e-6)), g.op("Add", radius, g.const(1e-6)))
    sin2 = g.op("Div", g.op("Neg", cxy), g.op("Add", radius, g.const(1e-6)))
    cos = g.op("Sqrt", g.op("Relu", g.affine(cos2, 0.5, 0.5)))
    sin = g.op("Div", sin2, g.affine(cos, 2.0, 1e-6))
    return dict(area=area, mx=mx, my=my, width=width, height=height, cos=cos, sin=sin)


def _pose_points(g: _Graph, geo: dict[str, str], px, py) -> tuple[str, str]:
    """Points given in units of (width, height) around the centre, rotated and placed."""
    ox = g.op("Mul", geo["width"], g.const(px))
    oy = g.op("Mul", geo["height"], g.const(py))
    x = g.op("Add", geo["mx"], g.op("Sub", g.op("Mul", geo["cos"], ox), g.op("Mul", geo["sin"], oy)))
    y = g.op("Add", geo["my"], g.op("Add", g.op("Mul", geo["sin"], ox), g.op("Mul", geo["cos"], oy)))
    return x, y


def _mean_face_units() -> np.ndarray:
    """The mean face in units of the marker's (width, height): x / 1.2, y / 1.6, z / 1.6."""
    return mean_face() * [SIGMA_PER_HEIGHT / MEAN_ASPECT, SIGMA_PER_HEIGHT, SIGMA_PER_HEIGHT]


def _rows(g: _Graph, columns: list[str]) -> str:
    """[1, 1, h, w] maps -> [h*w*2, C] rows (two identical anchors per cell)."""
    stacked = g.op("Concat", *columns, axis=1)
    rows = g.op("Reshape", g.op("Transpose", stacked, perm=[0, 2, 3, 1]), g.const([-1, len(columns)]))
    return g.op("Reshape", g.op("Concat", rows, rows, axis=1), g.const([-1, len(columns)]))


def _moment_kernel(stride: int) -> np.ndarray:
    """[6, 1, 8s, 8s] kernels: 1, u, v, u^2, v^2, uv with (u, v) pixel centres in strides from the anchor."""
    k = 8 * stride
    coords = (np.arange(k) + 0.5 - 4 * stride) / stride
    v, u = np.meshgrid(coords, coords, indexing="ij")
    return np.stack([np.ones_like(u), u, v, u * u, v * v, u * v])[:, None].astype(np.float32)


def _detector_stride(g: _Graph, mass: str, mass_level: str, s: int) -> tuple[str, str, str]:
    k, inner_pads, outer_pads = 8 * s, [4 * s, 4 * s, 3 * s, 3 * s], [5 * s, 5 * s, 4 * s, 4 * s]
    moments = g.op("Conv", mass, g.const(_moment_kernel(s)), strides=[s, s], pads=inner_pads)
    geo = _geometry(g, [g.channel(moments, i) for i in range(6)], pixel=1.0 / s)
    pool = dict(strides=[s, s], count_include_pad=1)
    level_sum = g.op("Mul", g.op("AveragePool", mass_level, kernel_shape=[k, k], pads=inner_pads, **pool),
                     g.const(float(k * k)))
    outer = g.op("Mul", g.op("AveragePool", mass, kernel_shape=[k + 2 * s, k + 2 * s], pads=outer_pads, **pool),
                 g.const(float((k + 2 * s) ** 2)))
    share = g.op("Div", geo["area"], g.op("Add", outer, g.const(1e-6)))
    ring_density = g.op("Div", g.op("Sub", outer, geo["area"]), g.const(float((k + 2 * s) ** 2 - k * k)))
    contained = g.op("Mul", g.op("Mul", share, g.op("Mul", share, share)), g.clip01(g.affine(ring_density, -10.0, 1.0)))
    level = g.op("Div", level_sum, g.op("Add", geo["area"], g.const(1e-6)))
    size_fit = g.clip01(g.affine(geo["height"], s / 8.0, -1.0))
    fill = g.clip01(g.op("Div", geo["area"], g.op("Add", g.op("Mul", g.op("Mul", geo["width"], geo["height"]),
                                                                g.const(float(s * s))), g.const(1e-6))))
    score = g.op("Mul", g.op("Mul", contained, level), g.op("Mul", size_fit, g.op("Mul", fill, fill)))
    abs_cos, abs_sin = g.op("Abs", geo["cos"]), g.op("Abs", geo["sin"])
    half_w, half_h = (g.op("Mul", geo[n], g.const(0.5)) for n in ("width", "height"))
    ext_x = g.op("Add", g.op("Mul", half_w, abs_cos), g.op("Mul", half_h, abs_sin))
    ext_y = g.op("Add", g.op("Mul", half_w, abs_sin), g.op("Mul", half_h, abs_cos))
    box = [g.op("Sub", ext_x, geo["mx"]), g.op("Sub", ext_y, geo["my"]),
           g.op("Add", ext_x, geo["mx"]), g.op("Add", ext_y, geo["my"])]
    kps_units = five_from_68(_mean_face_units())
    kps = []
    for px, py in kps_units[:, :2]:
        kps.extend(_pose_points(g, geo, float(px), float(py)))
    return _rows(g, [score]), _rows(g, box), _rows(g, kps)


def build_detector(path: Path) -> None:
    from onnx import TensorProto, helper
    g = _Graph()
    mass, mass_level = _marker_maps(g, "input.1")
    outs = [_detector_stride(g, mass, mass_level, s) for s in STRIDES]
    outputs = []
    for kind, width in ((0, 1), (1, 4), (2, 10)):
        for s, stride_outs in zip(STRIDES, outs):
            name = g.op("Identity", stride_outs[kind])
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{s}", width]))
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])]
    g.model(inputs, outputs, path)


def _crop_moments(g: _Graph, mass: str, size: int) -> list[str]:
    """Raw moments over a whole size x size crop with coordinates u = (pixel centre) / (size/2) - 1."""
    coords = (np.arange(size) + 0.5) / (size / 2) - 1
    v, u = np.meshgrid(coords, coords, indexing="ij")
    maps = [None, u, v, u * u, v * v, u * v]
    axes = g.const([2, 3])
    return [g.op("ReduceSum", mass if w is None else g.op("Mul", mass, g.const(w[None, None])), axes, keepdims=1)
            for w in maps]


def build_landmarks(path: Path, dims: int) -> None:
    """The 3D 68-point model (dims 3, output [N, 3309]) or the 2D 106-point one (dims 2, [N, 212])."""
    from onnx import TensorProto, helper
    g = _Graph()
    mass, _ = _marker_maps(g, "data")
    geo = _geometry(g, _crop_moments(g, mass, 192), pixel=1.0 / 96)
    units = _mean_face_units()
    if dims == 2:
        units = np.concatenate([units, (units[:-1] + units[1:])[:38] / 2])
    x, y = _pose_points(g, geo, units[:, 0].reshape(1, -1, 1, 1), units[:, 1].reshape(1, -1, 1, 1))
    coords = [x, y]
    if dims == 3:
        coords.append(g.op("Mul", geo["height"], g.const(units[:, 2].reshape(1, -1, 1, 1))))
    points = g.op("Reshape", g.op("Concat", *coords, axis=2), g.const([1, -1]))
    if dims == 3:
        points = g.op("Concat", g.const(np.zeros((1, 3309 - 68 * 3))), points, axis=1)
    out = g.op("Identity", points)
    width = 3309 if dims == 3 else 212
    g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 192, 192])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", width])], path)


def build_recognition(path: Path, seed: int) -> None:
    from onnx import TensorProto, helper
    g = _Graph()
    pooled = g.op("AveragePool", "input.1", kernel_shape=[8, 8], strides=[8, 8])
    flat = g.op("Reshape", pooled, g.const([-1, 3 * 14 * 14]))
    weights = np.random.default_rng(seed).normal(0, 1, (3 * 14 * 14, 512)) / math.sqrt(3 * 14 * 14)
    out = g.op("MatMul", flat, g.const(weights))
    g.model([helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 512])], path)


def build_genderage(path: Path) -> None:
    from onnx import TensorProto, helper
    g = _Graph()
    pooled = g.op("Reshape", g.op("GlobalAveragePool", "data"), g.const([-1, 3]))
    out = g.op("Gemm", pooled, g.const(np.eye(3) * 0.25), g.const(np.array([0.0, 0.1, 0.3])))
    g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 96, 96])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 3])], path)


def insightface_pack(name: str = "antelopev2") -> Path:
    """Build (once) the synthetic pack ``name`` and return its folder."""
    folder = insightface_root() / "models" / name
    stamp = folder / f".idfusion-fixture-{FIXTURE_VERSION}"
    if stamp.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(".idfusion-fixture-*"):
        old.unlink()
    for file_name, task in PACK_FILES[name].items():
        path = folder / file_name
        if task == "detection":
            build_detector(path)
        elif task == "landmark_3d_68":
            build_landmarks(path, dims=3)
        elif task == "landmark_2d_106":
            build_landmarks(path, dims=2)
        elif task == "recognition":
            build_recognition(path, seed=sorted(PACK_FILES).index(name))
        else:
            build_genderage(path)
    stamp.write_text(FIXTURE_VERSION)
    return folder


# --- facexlib weights -------------------------------------------------------------------------

def facexlib_weights() -> Path:
    """Random-weight ``parsing_bisenet.pth`` and ``detection_Resnet50_Final.pth`` (written once)."""
    import torch
    folder = facexlib_root()
    folder.mkdir(parents=True, exist_ok=True)
    builders = {"parsing_bisenet.pth": _bisenet, "detection_Resnet50_Final.pth": _retinaface}
    for file_name, build in builders.items():
        path = folder / file_name
        if path.is_file():
            continue
        torch.manual_seed(0)
        state = {k: v.detach().clone() for k, v in build().state_dict().items()}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.rename(path)
    return folder


def _bisenet():
    from facexlib.parsing.bisenet import BiSeNet
    return BiSeNet(num_class=19)


def _retinaface():
    from facexlib.detection.retinaface import RetinaFace
    return RetinaFace(network_name="resnet50", half=False, device="cpu")


# --- a ControlNet for the pose-driven workflow -------------------------------------------------

CONTROLNET = "idfusion-random-controlnet-sd15.safetensors"


def sd15_controlnet() -> Path:
    """A full-size random-weight SD1.5 ControlNet (3-channel hint) that ControlNetLoader loads."""
    path = CACHE / "models" / "controlnet" / CONTROLNET
    if path.is_file():
        return path
    import torch

    from .host import boot
    from .models import init_weights, sd15_unet_config
    boot()
    import comfy.cldm.cldm
    import comfy.utils
    config = sd15_unet_config()
    config.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float16, device="cpu", **config)
    init_weights(net, seed=4)
    state = {k: v.to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    comfy.utils.save_torch_file(state, str(tmp))
    tmp.rename(path)
    return path
