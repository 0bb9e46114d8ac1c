"""The landmark predictor's core against exact synthetic ground truth, and the drawings.

A synthetic 3D face (68 points in the 68-point scheme) is posed with known rotations,
scales and translations; identities differ by smooth shape changes, expressions move the
eyelids, brows and lower lip.
"""
import math

import numpy as np
import pytest

from IDFusion.models.faces import landmarks as lm


def arc(n, cx, cy, rx, ry, start, stop, z=0.0):
    t = np.linspace(start, stop, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t), np.full(n, z)], axis=1)


def synthetic_face() -> np.ndarray:
    """A face-like 3D shape [68, 3] in the 68-point order: x right, y down, z towards the viewer."""
    jaw = arc(17, 0, -0.3, 0.62, 0.88, math.pi, 0)
    jaw[:, 2] = -0.3 + 0.7 * np.sin(np.linspace(0, math.pi, 17))
    brow_l = arc(5, -0.3, -0.38, 0.2, 0.08, math.pi, 2 * math.pi, 0.3)
    brow_r = arc(5, 0.3, -0.38, 0.2, 0.08, math.pi, 2 * math.pi, 0.3)
    bridge = np.stack([np.zeros(4), np.linspace(-0.3, -0.12, 4), np.linspace(0.45, 0.6, 4)], axis=1)
    base = np.stack([np.linspace(-0.12, 0.12, 5), [0.02, 0.04, 0.05, 0.04, 0.02], [0.42, 0.47, 0.52, 0.47, 0.42]], 1)
    eye_l = arc(7, -0.27, -0.3, 0.11, 0.045, math.pi, 3 * math.pi, 0.28)[:6]
    eye_r = arc(7, 0.27, -0.3, 0.11, 0.045, math.pi, 3 * math.pi, 0.28)[:6]
    outer = arc(13, 0, 0.24, 0.22, 0.07, math.pi, 3 * math.pi, 0.4)[:12]
    inner = arc(9, 0, 0.24, 0.15, 0.025, math.pi, 3 * math.pi, 0.42)[:8]
    face = np.concatenate([jaw, brow_l, brow_r, bridge, base, eye_l, eye_r, outer, inner])
    assert face.shape == (68, 3)
    return face


def rotation(pitch, yaw, roll) -> np.ndarray:
    p, y, r = (math.radians(a) for a in (pitch, yaw, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose(scale=150.0, angles=(10, -25, 15), translation=(320, 240, 0)) -> lm.Pose:
    return lm.Pose(scale, rotation(*angles), np.array(translation, float))


def other_person(face: np.ndarray, seed: int, amount: float = 0.06) -> np.ndarray:
    """A different identity: smooth shape changes (wider jaw, longer nose, set eyes) plus noise."""
    rng = np.random.default_rng(seed)
    out = face.copy()
    out[:17, 0] *= 1 + amount * rng.uniform(-1, 1)
    out[27:36, 1] += amount * rng.uniform(-0.5, 0.5)
    out[36:48, 0] *= 1 + amount * rng.uniform(-1, 1)
    return out + rng.normal(0, amount / 4, out.shape)


def with_expression(face: np.ndarray) -> np.ndarray:
    """Mouth open (lower lip and inner lower lip down), eyelids half closed, brows raised."""
    out = face.copy()
    out[[55, 56, 57, 58, 59, 64, 65, 66, 67], 1] += 0.12
    out[[37, 38, 43, 44], 1] += 0.03
    out[[40, 41, 46, 47], 1] -= 0.01
    out[17:27, 1] -= 0.06
    return out


REFERENCE = synthetic_face()


def canonicalised(face: np.ndarray) -> np.ndarray:
    """The face in the frame the predictor measures poses in (its best fit to the reference is identity)."""
    return lm.canonical_shape(face, REFERENCE)


@pytest.mark.parametrize("dims", [2, 3])
def test_similarity_transform_recovers_a_known_transform(dims):
    rng = np.random.default_rng(dims)
    src = rng.normal(size=(30, dims))
    rot = rotation(20, -35, 50)[:dims, :dims] if dims == 3 else np.array([[0.6, -0.8], [0.8, 0.6]])
    dst = 2.5 * src @ rot.T + rng.normal(size=dims)
    weights = np.ones(30)
    weights[:5] = 0.0
    dst[:5] += 100.0  # outliers with weight 0 must not matter
    scale, r, t = lm.similarity_transform(src, dst, weights)
    assert scale == pytest.approx(2.5, abs=1e-10)
    np.testing.assert_allclose(r, rot, atol=1e-10)
    np.testing.assert_allclose(scale * src[5:] @ r.T + t, dst[5:], atol=1e-9)


def test_similarity_transform_never_returns_a_reflection():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(20, 3))
    mirrored = src * [-1, 1, 1]
    _, r, _ = lm.similarity_transform(src, mirrored)
    assert np.linalg.det(r) == pytest.approx(1.0)


@pytest.mark.parametrize("expression", [0.0, 0.5, 1.0])
def test_source_equal_to_driving_returns_the_driving_landmarks(expression):
    driving = pose().apply(with_expression(other_person(REFERENCE, 3)))
    predicted = lm.predict_landmarks([driving], driving, REFERENCE, expression)
    np.testing.assert_allclose(predicted, driving, atol=1e-9)


@pytest.mark.parametrize("angles", [(0, 0, 0), (15, -30, 20), (-20, 40, -35)])
def test_source_shape_in_the_driving_pose_is_exact(angles):
    """Expression 0: the source's shape, posed exactly like the (differently shaped) driving face."""
    source = canonicalised(other_person(REFERENCE, 1))
    driving_pose = pose(angles=angles)
    driving = driving_pose.apply(canonicalised(with_expression(other_person(REFERENCE, 2))))
    source_photo = pose(90.0, (5, 20, -10), (100, 80, 5)).apply(source)
    predicted = lm.predict_landmarks([source_photo], driving, REFERENCE, expression=0.0)
    np.testing.assert_allclose(predicted, driving_pose.apply(source), atol=1e-8)


def test_same_person_takes_the_driving_expression_exactly():
    """Expression 1, same identity: the prediction is the driving photo (mouth open, eyes half shut)."""
    person = canonicalised(other_person(REFERENCE, 4))
    neutral_photo = pose(120.0, (0, 10, 5), (200, 200, 0)).apply(person)
    driving = pose(angles=(-10, 35, -20)).apply(with_expression(person))
    predicted = lm.predict_landmarks([neutral_photo], driving, REFERENCE, expression=1.0)
    np.testing.assert_allclose(predicted, driving, atol=1e-8)


@pytest.mark.parametrize("seed", range(10))
def test_identity_differences_bias_the_pose_only_slightly(seed):
    """Faces not canonicalised, identities 3 % apart (jaw width, nose length, eye spacing, and
    0.75 % noise per point): the prediction stays within 5 % of the inter-ocular distance of
    the source shape posed with the true driving pose (40 seeds measured: at most 4.6 %)."""
    true_pose = pose(angles=(10, -30, 25))
    source = other_person(REFERENCE, 100 + seed, amount=0.03)
    driving = true_pose.apply(other_person(REFERENCE, 200 + seed, amount=0.03))
    predicted = lm.predict_landmarks([source], driving, REFERENCE, expression=0.0)
    expected = true_pose.apply(source)
    interocular = np.linalg.norm(expected[36:42].mean(0) - expected[42:48].mean(0))
    assert np.abs(predicted - expected)[:, :2].max() < 0.05 * interocular


def test_opening_the_mouth_does_not_move_the_estimated_pose():
    face = other_person(REFERENCE, 7)
    known = pose(angles=(12, 22, -8))
    neutral = lm.estimate_pose(known.apply(face), REFERENCE)
    talking = lm.estimate_pose(known.apply(with_expression(face)), REFERENCE)
    np.testing.assert_allclose(talking.rotation, neutral.rotation, atol=1e-12)
    assert talking.scale == pytest.approx(neutral.scale)


def test_several_source_photos_of_one_person_average_to_the_same_shape():
    person = canonicalised(other_person(REFERENCE, 8))
    photos = [pose(80, (0, 0, 0), (50, 60, 0)).apply(person), pose(140, (10, -40, 15), (300, 10, 3)).apply(person)]
    driving = pose(angles=(5, 15, 30)).apply(canonicalised(other_person(REFERENCE, 9)))
    one = lm.predict_landmarks(photos[:1], driving, REFERENCE, 0.0)
    both = lm.predict_landmarks(photos, driving, REFERENCE, 0.0)
    np.testing.assert_allclose(both, one, atol=1e-8)


def test_no_source_is_an_error():
    with pytest.raises(ValueError, match="at least one source"):
        lm.predict_landmarks([], REFERENCE, REFERENCE)


# --- drawings ---------------------------------------------------------------------------------

def face_2d(cx=200.0, cy=150.0, scale=100.0) -> np.ndarray:
    return REFERENCE[:, :2] * scale + [cx, cy]


def test_instantid_drawing_has_its_five_coloured_dots_at_the_keypoints():
    points = face_2d()
    image = lm.draw_instantid_kps([points], 300, 400)
    assert image.shape == (300, 400, 3) and image.dtype == np.uint8
    for color, (x, y) in zip(lm.INSTANTID_COLORS, lm.five_keypoints(points)):
        assert tuple(image[int(y), int(x)]) == color
    sticks = image[(image.sum(-1) > 0)]
    assert sticks.max() == 255 and ((sticks == 153) | (sticks == 0) | (sticks == 255)).all()


def test_openpose_face_drawing_is_white_dots_at_every_landmark():
    points = face_2d()
    image = lm.draw_openpose_face([points], 300, 400)
    assert all((image[int(y), int(x)] == 255).all() for x, y in points)
    far = np.ones((300, 400), bool)
    for x, y in points:
        far[max(int(y) - 5, 0):int(y) + 6, max(int(x) - 5, 0):int(x) + 6] = False
    assert image[far].max() == 0


def test_face_lines_follow_the_jaw_and_nothing_else():
    points = face_2d()
    image = lm.draw_face_lines([points], 300, 400)
    on = image[..., 0] > 0
    x, y = np.round((points[0] + points[1]) / 2).astype(int)  # halfway along the jaw's first segment
    assert on[y - 1:y + 2, x - 1:x + 2].any()
    assert not on[:20].any() and not on[:, :60].any()


def test_landmarks_render_one_image_per_driving_image_at_its_size():
    result = lm.Landmarks(points=(face_2d()[None], np.zeros((0, 68, 2))), sizes=((300, 400), (300, 400)),
                          style="openpose_face")
    images = result.render()
    assert tuple(images.shape) == (2, 300, 400, 3)
    assert images[0].max() == 1.0 and images[1].max() == 0.0


def test_unknown_style_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="instantid_kps, openpose_face, face_lines"):
        lm.Landmarks(points=(face_2d()[None],), sizes=((300, 400),), style="mesh")
