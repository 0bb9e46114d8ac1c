"""IDFusion Landmark Predictor through the real insightface 3D landmarks of the synthetic packs:
the synthetic 3D model reports a known shape (insightface's mean face, stretched by the
painted face's aspect) in a known pose (the painted face's roll, size and place)."""
import shutil

import numpy as np
import pytest
import torch

from idf_testlib import face_fixtures as ff

#: Pixels the detected 3D landmarks may differ from the painted ground truth.
TOLERANCE = 1.5


@pytest.fixture(scope="module")
def analyzer(host):
    ff.insightface_pack("antelopev2")
    from IDFusion.models.faces.analysis import load_analyzer
    return load_analyzer("antelopev2", "CPU", 320)


def faces_of(analyzer, *arrays):
    from IDFusion.nodes.faces import FaceDetect
    image = ff.to_image(*arrays)
    return FaceDetect.execute(analyzer, image, "largest", 0, 0.5, "skip", 224, 0.0).result[0]


def predict(source, driving, style="instantid_kps", expression=1.0):
    from IDFusion.nodes.landmarks import LandmarkPredictor
    return LandmarkPredictor.execute(source, driving, style, expression).result


WIDE = ff.MarkerFace(160, 170, 110, 120)            # a broad face, upright
NARROW = ff.MarkerFace(230, 150, 70, 110, roll=20)  # a narrow face, turned 20 degrees


def test_the_source_shape_is_drawn_in_the_driving_pose(analyzer):
    from IDFusion.models.faces import landmarks as lm
    from IDFusion.models.faces.analysis import mean_face
    source = faces_of(analyzer, ff.scene(340, 320, [WIDE]))
    driving = faces_of(analyzer, ff.scene(300, 420, [NARROW], seed=2))
    control, result = predict(source, driving)
    expected = lm.predict_landmarks([WIDE.landmarks_3d()], NARROW.landmarks_3d(), mean_face())[:, :2]
    assert tuple(control.shape) == (1, 300, 420, 3) and result.sizes == ((300, 420),)
    np.testing.assert_allclose(result.points[0][0], expected, atol=TOLERANCE)
    # the prediction keeps the source's proportions: wider than the driving face, turned like it
    width = lambda p: np.linalg.norm(p[16] - p[0])  # noqa: E731
    assert width(result.points[0][0]) / width(NARROW.landmarks_3d()[:, :2]) > 1.1
    eyes = lm.five_keypoints(result.points[0][0])[:2]
    assert np.degrees(np.arctan2(*(eyes[1] - eyes[0])[::-1])) == pytest.approx(20, abs=1.5)


def test_the_same_photo_as_source_and_driving_gives_its_own_landmarks(analyzer):
    faces = faces_of(analyzer, ff.scene(300, 420, [NARROW]))
    _, result = predict(faces, faces)
    np.testing.assert_allclose(result.points[0][0], faces.all[0].landmark_3d_68[:, :2], atol=1e-3)


def test_instantid_control_has_its_coloured_dots_on_the_predicted_keypoints(analyzer):
    from IDFusion.models.faces import landmarks as lm
    source = faces_of(analyzer, ff.scene(340, 320, [WIDE]))
    driving = faces_of(analyzer, ff.scene(300, 420, [NARROW], seed=2))
    control, result = predict(source, driving)
    pixels = (control[0].numpy() * 255).round().astype(int)
    for color, (x, y) in zip(lm.INSTANTID_COLORS, lm.five_keypoints(result.points[0][0])):
        assert tuple(pixels[int(y), int(x)]) == color


@pytest.mark.parametrize("style", ["openpose_face", "face_lines"])
def test_every_style_draws_white_on_black_near_the_points(analyzer, style):
    faces = faces_of(analyzer, ff.scene(300, 420, [NARROW]))
    control, result = predict(faces, faces, style=style)
    drawn = control[0].sum(-1) > 0
    ys, xs = np.nonzero(drawn.numpy())
    points = result.points[0][0]
    assert control.max() == 1.0 and len(xs) > 100
    assert xs.min() >= points[:, 0].min() - 5 and xs.max() <= points[:, 0].max() + 5


def test_driving_images_without_a_face_get_a_black_control_image(analyzer):
    source = faces_of(analyzer, ff.scene(300, 300, [WIDE]))
    driving = faces_of(analyzer, ff.scene(300, 420, [NARROW]), ff.canvas(300, 420, seed=5))
    control, result = predict(source, driving)
    assert tuple(control.shape) == (2, 300, 420, 3)
    assert control[0].max() > 0 and control[1].max() == 0 and result.points[1].shape == (0, 68, 2)


def test_a_source_without_a_face_is_an_error(analyzer):
    empty = faces_of(analyzer, ff.canvas(300, 300))
    driving = faces_of(analyzer, ff.scene(300, 420, [NARROW]))
    with pytest.raises(ValueError, match="IDFusionLandmarkPredictor: the source has no face"):
        predict(empty, driving)


def test_a_pack_without_the_3d_model_is_named(host, monkeypatch, tmp_path):
    import folder_paths

    from IDFusion.models.faces.analysis import load_analyzer
    pack = tmp_path / "models" / "no3d"
    shutil.copytree(ff.insightface_pack("antelopev2"), pack)
    (pack / "1k3d68.onnx").unlink()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(tmp_path)], set()))
    faces = faces_of(load_analyzer("no3d", "CPU", 320), ff.scene(300, 420, [NARROW]))
    with pytest.raises(ValueError, match=r"the source face has no 3D landmarks; .* \(1k3d68.onnx"):
        predict(faces, faces)


def test_real_photos_drive_the_pose_of_a_painted_source(analyzer):
    """Grace Hopper with a face painted where hers is, driving the astronaut's painted face."""
    source = faces_of(analyzer, ff.paint(ff.astronaut(), ff.MarkerFace(230, 130, 90, 120)))
    driving = faces_of(analyzer, ff.paint(ff.grace_hopper(), ff.MarkerFace(260, 200, 110, 150, roll=-12)))
    control, result = predict(source, driving, style="face_lines")
    assert tuple(control.shape) == (1, 600, 512, 3) and control.max() == 1.0
    assert result.points[0].shape == (1, 68, 2)
    assert torch.isfinite(control).all()
