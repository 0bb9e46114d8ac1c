"""The landmark predictor (FaceSnap's idea, with 3D landmarks instead of a 3DMM) and the
ControlNet drawings of face landmarks.

A face's 68 3D landmarks ``P`` [68, 3] (x, y in image pixels, z depth in the same units)
are read as a similarity pose applied to a canonical shape: ``P = s * C @ R.T + t``. The
pose is the weighted least-squares similarity (Umeyama) that carries a reference shape (the
mean face) onto ``P`` over the rigid points (temples, nose, eye corners), so an open mouth
does not tilt the head; ``C`` is what is left, the identity's shape plus its expression.
The prediction keeps the source's canonical shape (averaged over its photos), takes each
expression region (brows, eyes, mouth) from the driving face relative to that region's
anchor (eye corners for eyes and brows, the top of the upper lip for the mouth: points an
expression hardly moves), re-attaches it at the source's anchor, and applies the driving
pose. With the source equal to the driving face it returns the driving landmarks exactly.

numpy only at import; the drawing functions import cv2 when they run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Points that move with the head but not with the expression (68-point scheme).
RIGID_POINTS = (*range(0, 5), *range(12, 17), *range(27, 36), 36, 39, 42, 45)
#: Regions whose shape is the expression, each with its anchor: (region points, anchor points).
#: Brows and eyes hang on their eye corners, the mouth (outer and inner lips) on the upper lip's top.
EXPRESSION_REGIONS = ((tuple(range(17, 22)), (36, 39)), (tuple(range(22, 27)), (42, 45)),
                      (tuple(range(36, 42)), (36, 39)), (tuple(range(42, 48)), (42, 45)),
                      (tuple(range(48, 68)), (50, 51, 52)))
#: Eye centres, nose tip, mouth corners: the five keypoints InstantID draws.
FIVE_POINTS = (tuple(range(36, 42)), tuple(range(42, 48)), (30,), (48,), (54,))
#: Polylines of the 68-point scheme: (indices, closed).
FACE_LINES = ((range(0, 17), False), (range(17, 22), False), (range(22, 27), False), (range(27, 31), False),
              (range(31, 36), False), (range(36, 42), True), (range(42, 48), True), (range(48, 60), True),
              (range(60, 68), True))
INSTANTID_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
INSTANTID_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
STYLES = ("instantid_kps", "openpose_face", "face_lines")


@dataclass(frozen=True)
class Pose:
    """A similarity transform ``x -> scale * x @ rotation.T + translation`` in 3D."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    def apply(self, points: np.ndarray) -> np.ndarray:
        """[N, 3] canonical points -> [N, 3] posed points."""
        return self.scale * points @ self.rotation.T + self.translation

    def invert(self, points: np.ndarray) -> np.ndarray:
        """[N, 3] posed points -> [N, 3] canonical points."""
        return (points - self.translation) @ self.rotation / self.scale


def similarity_transform(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None):
    """Weighted least-squares similarity (Umeyama) with ``dst ≈ scale * src @ R.T + t``.

    src, dst: [N, D] corresponding points; weights: [N] or None (all 1).
    Returns (scale: float, R: [D, D] proper rotation, t: [D]).
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mu_src, mu_dst = w @ src, w @ dst
    a, b = src - mu_src, dst - mu_dst
    cov = (b * w[:, None]).T @ a
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.ones(len(sigma))
    sign[-1] = np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0
    rotation = u @ np.diag(sign) @ vt
    scale = float((sigma * sign).sum() / (w @ (a * a).sum(1)))
    return scale, rotation, mu_dst - scale * mu_src @ rotation.T


def rigid_weights(count: int = 68) -> np.ndarray:
    weights = np.zeros(count)
    weights[list(RIGID_POINTS)] = 1.0
    return weights


def estimate_pose(points: np.ndarray, reference: np.ndarray) -> Pose:
    """The pose of 3D landmarks [68, 3] relative to a reference shape [68, 3] (the mean face)."""
    scale, rotation, translation = similarity_transform(reference, points, rigid_weights(len(points)))
    return Pose(scale, rotation, translation)


def canonical_shape(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[68, 3] landmarks with their pose removed: the shape in the reference's frame."""
    return estimate_pose(points, reference).invert(np.asarray(points, np.float64))


def transfer_expression(source: np.ndarray, driving: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """The source's canonical shape with its expression regions blended towards the driving's.

    source, driving: canonical shapes [68, 3]; strength 0 keeps the source's expression, 1
    takes the driving's. A region's points relative to its anchor become
    ``(1 - strength) * source + strength * driving`` and hang on the source's anchor.
    """
    out = np.array(source, np.float64)
    for region, anchor in EXPRESSION_REGIONS:
        idx, anchor = list(region), list(anchor)
        src_anchor, drv_anchor = source[anchor].mean(0), driving[anchor].mean(0)
        out[idx] = src_anchor + (1.0 - strength) * (source[idx] - src_anchor) + strength * (driving[idx] - drv_anchor)
    return out


def predict_landmarks(sources: list[np.ndarray], driving: np.ndarray, reference: np.ndarray,
                      expression: float = 1.0) -> np.ndarray:
    """The source identity's 3D landmarks in the driving face's pose and expression.

    sources: one or more [68, 3] landmark sets of the source person (their canonical shapes
    are averaged); driving: [68, 3]; reference: the mean face [68, 3]; expression in [0, 1].
    Returns [68, 3] in the driving image's coordinates (x, y pixels; drop z to project).
    """
    if not sources:
        raise ValueError("predict_landmarks needs at least one source face")
    identity = np.mean([canonical_shape(p, reference) for p in sources], axis=0)
    pose = estimate_pose(driving, reference)
    shape = transfer_expression(identity, pose.invert(np.asarray(driving, np.float64)), expression)
    return pose.apply(shape)


def five_keypoints(points: np.ndarray) -> np.ndarray:
    """[68, D] landmarks -> [5, D]: eye centres, nose tip, mouth corners (insightface's kps order)."""
    return np.stack([points[list(idx)].mean(0) for idx in FIVE_POINTS])


# --- drawing -----------------------------------------------------------------------------------

def draw_instantid_kps(faces: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """InstantID's keypoint image: four coloured sticks to the nose, dimmed to 60 %, then five
    dots of radius 10. faces: [68, 2] landmarks per face. Returns [H, W, 3] uint8."""
    import cv2
    canvas = np.zeros((height, width, 3), np.float64)
    kps_list = [five_keypoints(points) for points in faces]
    for kps in kps_list:
        for a, b in INSTANTID_LIMBS:
            (xa, ya), (xb, yb) = kps[a], kps[b]
            length = float(np.hypot(xa - xb, ya - yb))
            angle = int(np.degrees(np.arctan2(ya - yb, xa - xb)))
            centre = (int((xa + xb) / 2), int((ya + yb) / 2))
            polygon = cv2.ellipse2Poly(centre, (int(length / 2), 4), angle, 0, 360, 1)
            canvas = cv2.fillConvexPoly(canvas, polygon, INSTANTID_COLORS[a])
    canvas = (canvas * 0.6).astype(np.uint8)
    for kps in kps_list:
        for color, (x, y) in zip(INSTANTID_COLORS, kps):
            cv2.circle(canvas, (int(x), int(y)), 10, color, -1)
    return canvas


def draw_openpose_face(faces: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """OpenPose/DWPose face keypoints: a white dot of radius 3 per landmark. Returns [H, W, 3] uint8."""
    import cv2
    canvas = np.zeros((height, width, 3), np.uint8)
    for points in faces:
        for x, y in points:
            if 0 <= x < width and 0 <= y < height:
                cv2.circle(canvas, (int(x), int(y)), 3, (255, 255, 255), -1)
    return canvas


def draw_face_lines(faces: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """White contour lines of the 68-point scheme (jaw, brows, nose, eyes, lips). [H, W, 3] uint8."""
    import cv2
    canvas = np.zeros((height, width, 3), np.uint8)
    thickness = max(1, round(min(height, width) / 256))
    for points in faces:
        for idx, closed in FACE_LINES:
            line = np.round(points[list(idx)] * 16).astype(np.int32)
            cv2.polylines(canvas, [line], closed, (255, 255, 255), thickness, cv2.LINE_AA, shift=4)
    return canvas


DRAWERS = {"instantid_kps": draw_instantid_kps, "openpose_face": draw_openpose_face, "face_lines": draw_face_lines}


@dataclass(frozen=True)
class Landmarks:
    """2D face landmarks per image, with the style they are drawn in.

    points: per image, an array [F, 68, 2] (F faces, possibly 0) in pixels.
    sizes:  per image, (height, width).
    style:  one of ``STYLES``.
    """

    points: tuple[np.ndarray, ...]
    sizes: tuple[tuple[int, int], ...]
    style: str = "instantid_kps"

    def __post_init__(self):
        if self.style not in DRAWERS:
            raise ValueError(f"landmark style must be one of {', '.join(STYLES)}, got '{self.style}'")
        if len(self.points) != len(self.sizes):
            raise ValueError(f"{len(self.points)} point sets for {len(self.sizes)} image sizes")

    def render(self) -> torch.Tensor:
        """The ControlNet images [B, H, W, 3] float in [0, 1] (all images share the first size)."""
        height, width = self.sizes[0]
        if any(size != (height, width) for size in self.sizes):
            raise ValueError(f"landmark images differ in size ({sorted(set(self.sizes))}); "
                             "an IMAGE batch needs one size")
        draw = DRAWERS[self.style]
        images = [draw(list(points), height, width) for points in self.points]
        return torch.from_numpy(np.stack(images)).float() / 255.0
