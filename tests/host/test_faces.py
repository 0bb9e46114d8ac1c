"""Face analysis and detection through the real insightface code on the synthetic packs, and
the crops, position masks and input handling of IDFusion Face Detect."""
import logging
import math
import shutil

import numpy as np
import pytest
import torch

from idf_testlib import face_fixtures as ff

DET_SIZE = 320
#: Pixels a painted face's box, keypoints and landmarks may differ from the ground truth
#: (the detector sees the image resized; insightface crops with integer-pixel warps).
TOLERANCE = 1.5


@pytest.fixture(scope="module")
def packs(host):
    return {name: ff.insightface_pack(name) for name in ff.PACK_FILES}


@pytest.fixture(scope="module")
def analyzer(packs):
    from IDFusion.models.faces.analysis import load_analyzer
    return load_analyzer("antelopev2", "auto", DET_SIZE)


def detect_node(analyzer, image, **options):
    from IDFusion.nodes.faces import FaceDetect
    settings = dict(selection="largest", index=0, min_score=0.5, no_face="error", crop_size=224, margin=0.0)
    settings.update(options)
    return FaceDetect.execute(analyzer, image, **settings).result


@pytest.fixture
def insightface_models(host, monkeypatch, tmp_path):
    """An empty insightface model folder for this test only."""
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(tmp_path)], set()))
    return tmp_path


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt of insightface to fetch a file fails the test."""
    import insightface.utils.storage as storage

    def refuse(*args, **kwargs):
        raise AssertionError(f"insightface tried to download {args} {kwargs}")
    monkeypatch.setattr(storage, "download_file", refuse)
    monkeypatch.setattr(storage, "download", refuse)


# --- packs, loading, providers ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ff.PACK_FILES))
def test_the_real_insightface_routes_each_synthetic_file_to_its_task(packs, name, no_downloads):
    from IDFusion.models.faces.analysis import PACK_FILES, TASKS, load_analyzer
    assert sorted(p.name for p in packs[name].glob("*.onnx")) == sorted(PACK_FILES[name])
    analyzer = load_analyzer(name, "CPU", DET_SIZE)
    routed = {task: model.model_file.rsplit("/", 1)[-1] for task, model in analyzer.app.models.items()}
    expected = {task: file for file, task in ff.PACK_FILES[name].items() if task in TASKS}
    assert routed == expected


def test_the_loader_lists_packs_found_in_the_comfy_folder(packs):
    from IDFusion.models.faces.analysis import pack_names
    assert {"antelopev2", "buffalo_l"} <= set(pack_names())


def test_a_missing_pack_names_its_files_and_where_they_go(insightface_models, no_downloads):
    from IDFusion.models.faces.analysis import load_analyzer
    with pytest.raises(FileNotFoundError) as error:
        load_analyzer("buffalo_l", "auto", DET_SIZE)
    message = str(error.value)
    for name in ff.PACK_FILES["buffalo_l"]:
        assert name in message
    assert str(insightface_models / "models" / "buffalo_l") in message and "never downloads" in message


def test_a_pack_nested_one_folder_too_deep_says_which_files_to_move(packs, insightface_models, no_downloads):
    from IDFusion.models.faces.analysis import load_analyzer
    nested = insightface_models / "models" / "antelopev2" / "antelopev2"
    shutil.copytree(packs["antelopev2"], nested)
    with pytest.raises(FileNotFoundError, match="nested one folder too deep") as error:
        load_analyzer("antelopev2", "auto", DET_SIZE)
    assert f"from {nested} up into {nested.parent}" in str(error.value)


def test_a_pack_without_a_detector_is_refused_by_name(packs, insightface_models, no_downloads):
    from IDFusion.models.faces.analysis import load_analyzer
    folder = insightface_models / "models" / "partial"
    folder.mkdir(parents=True)
    shutil.copy(packs["antelopev2"] / "glintr100.onnx", folder)
    with pytest.raises(FileNotFoundError, match="'partial' .* has no detection model"):
        load_analyzer("partial", "auto", DET_SIZE)


@pytest.mark.parametrize("choice, available, providers, reason", [
    ("auto", ["CUDA", "CPU"], ["CUDA", "CPU"], None),
    ("auto", ["Azure", "CPU"], ["CPU"], None),
    ("auto", ["Dml", "CPU"], ["Dml", "CPU"], None),
    ("ROCm", ["ROCM", "CPU"], ["ROCM", "CPU"], None),
    ("CoreML", ["CoreML", "CPU"], ["CoreML", "CPU"], None),
    ("CPU", ["CUDA", "CPU"], ["CPU"], None),
    ("CUDA", ["CPU"], ["CPU"], "CUDA was requested"),
    ("DirectML", ["CPU"], ["CPU"], "DirectML was requested"),
])
def test_provider_choice_and_cpu_fallback(host, choice, available, providers, reason):
    """Provider names are onnxruntime's without the 'ExecutionProvider' suffix here."""
    from IDFusion.models.faces.analysis import choose_providers
    chosen, problem = choose_providers(choice, [f"{name}ExecutionProvider" for name in available])
    assert chosen == [f"{name}ExecutionProvider" for name in providers]
    assert (problem is None) if reason is None else (reason in problem)


def test_an_unavailable_provider_falls_back_to_cpu_with_one_log_line(packs, caplog):
    from IDFusion.models.faces.analysis import load_analyzer
    with caplog.at_level(logging.INFO, logger="IDFusion"):
        analyzer = load_analyzer("buffalo_l", "CUDA", DET_SIZE)
    lines = [r.getMessage() for r in caplog.records if r.name == "IDFusion"]
    assert analyzer.provider == "CPUExecutionProvider"
    assert len(lines) == 1 and "runs on CPUExecutionProvider" in lines[0] and "CUDA was requested" in lines[0]


# --- detection -----------------------------------------------------------------------------------

TWO_FACES = [ff.MarkerFace(150, 200, 90, 120), ff.MarkerFace(380, 260, 75, 100, roll=20, green=51)]


def test_detection_finds_the_painted_faces_with_their_geometry(analyzer):
    image = ff.scene(480, 512, TWO_FACES)
    faces = sorted(analyzer.detect(image, 0.3), key=lambda f: f.bbox[0])
    assert len(faces) == 2
    for face, truth in zip(faces, TWO_FACES):
        np.testing.assert_allclose(face.bbox, truth.box(), atol=TOLERANCE)
        np.testing.assert_allclose(face.kps, truth.kps(), atol=TOLERANCE)
        np.testing.assert_allclose(face.landmark_3d_68[:, :2], truth.landmarks_3d()[:, :2], atol=TOLERANCE)
        assert face.score == pytest.approx(truth.score(), abs=0.02)
        assert face.embedding.shape == (512,) and np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
        assert face.landmark_2d_106.shape == (106, 2)
        assert face.pose[2] == pytest.approx(truth.roll, abs=0.5)


def test_embeddings_depend_on_the_face_and_not_on_where_it_is(analyzer):
    a = analyzer.detect(ff.scene(300, 300, [ff.MarkerFace(100, 120, 75, 100)]), 0.3)[0]
    moved = analyzer.detect(ff.scene(300, 300, [ff.MarkerFace(200, 170, 75, 100)], seed=3), 0.3)[0]
    other = analyzer.detect(ff.scene(300, 300, [ff.MarkerFace(100, 120, 75, 100, green=60)]), 0.3)[0]
    assert float(a.embedding @ moved.embedding) > float(a.embedding @ other.embedding)
    assert float(a.embedding @ other.embedding) < 0.999


def test_min_score_keeps_or_drops_a_weak_face(analyzer):
    image = ff.to_image(ff.scene(300, 300, [ff.MarkerFace(150, 150, 75, 100, green=51)]))
    faces = detect_node(analyzer, image, min_score=0.5)[0]
    assert faces.count == 1 and faces.all[0].score == pytest.approx(0.6, abs=0.02)
    with pytest.raises(ValueError, match="image 0 of the batch has no face with score >= 0.7"):
        detect_node(analyzer, image, min_score=0.7)


def test_a_batch_with_a_faceless_image_names_it_or_skips_it(analyzer):
    images = ff.to_image(ff.scene(256, 256, [ff.MarkerFace(128, 128, 60, 80)]), ff.canvas(256, 256, 1),
                         ff.scene(256, 256, [ff.MarkerFace(70, 128, 45, 60), ff.MarkerFace(190, 128, 45, 60)]))
    with pytest.raises(ValueError, match=r"IDFusionFaceDetect: image 1 of the batch has no face .* no_face to 'skip'"):
        detect_node(analyzer, images)
    faces, crops, aligned, masks, preview = detect_node(analyzer, images, selection="left_to_right", no_face="skip")
    assert [len(faces.for_image(i)) for i in range(3)] == [1, 0, 2]
    assert [f.image_index for f in faces.all] == [0, 2, 2]
    assert tuple(crops.shape) == (3, 224, 224, 3) and tuple(aligned.shape) == (3, 112, 112, 3)
    assert tuple(masks.shape) == (3, 256, 256) and masks[1].max() == 0 and masks[0].max() == 1
    assert tuple(preview.shape) == (3, 256, 256, 3)
    assert faces.embeddings().shape == (3, 512)


THREE_FACES = [ff.MarkerFace(470, 150, 60, 80), ff.MarkerFace(90, 150, 45, 60), ff.MarkerFace(280, 150, 75, 100)]


@pytest.mark.parametrize("selection, index, centres", [
    ("largest", 0, [280]),
    ("left_to_right", 0, [90, 280, 470]),
    ("by_index", 2, [470]),
    ("by_index", 0, [90]),
])
def test_face_selection(analyzer, selection, index, centres):
    image = ff.to_image(ff.scene(300, 560, THREE_FACES))
    faces = detect_node(analyzer, image, selection=selection, index=index)[0]
    assert [(f.bbox[0] + f.bbox[2]) / 2 for f in faces.all] == pytest.approx(centres, abs=2)


def test_all_faces_come_best_score_first(analyzer):
    faces = [ff.MarkerFace(80, 150, 60, 80, green=60), ff.MarkerFace(220, 150, 60, 80)]
    found = detect_node(analyzer, ff.to_image(ff.scene(300, 320, faces)), selection="all", min_score=0.3)[0]
    assert [(f.bbox[0] + f.bbox[2]) / 2 for f in found.all] == pytest.approx([220, 80], abs=2)


def test_an_index_past_the_last_face_says_how_many_there_are(analyzer):
    image = ff.to_image(ff.scene(300, 560, THREE_FACES))
    with pytest.raises(ValueError, match="image 0 of the batch has 3 face.* no face at index 5; lower index"):
        detect_node(analyzer, image, selection="by_index", index=5)


# --- crops and masks -----------------------------------------------------------------------------

def test_flashface_crop_levels_the_eyes_and_keeps_only_the_box(analyzer):
    truth = ff.MarkerFace(200, 180, 90, 120, roll=25)
    image = ff.scene(360, 400, [truth])
    from IDFusion.models.faces.analysis import flashface_crop
    face = analyzer.detect(image, 0.5)[0]
    crop = flashface_crop(image.astype(np.float32) / 255, face.bbox, face.kps, 224)
    assert crop.shape == (224, 224, 3)
    magenta = (crop[..., 0] > 0.9) & (crop[..., 1] < 0.1) & (crop[..., 2] > 0.9)
    # the levelled face is an upright 90x120 rectangle scaled by 224 / max(box side)
    scale = 224 / max(face.width, face.height)
    rows, cols = np.nonzero(magenta)
    assert cols.max() - cols.min() + 1 == pytest.approx(90 * scale, abs=3)
    assert rows.max() - rows.min() + 1 == pytest.approx(120 * scale, abs=3)
    assert crop[0, 0].max() == 0 and crop[-1, -1].max() == 0


def official_crop(image: np.ndarray, box, kps, size: int) -> np.ndarray:
    """ali-vilab/FlashFace ``crop_face`` then ``PadToSquare(size)``, written from the official code
    (ldm/models/retinaface.py, flashface/all_finetune/utils.py) on an 8-bit RGB image."""
    from PIL import Image
    crop = Image.fromarray(image).crop(tuple(torch.tensor(box, dtype=torch.float64).round().tolist()))
    leye, reye = torch.tensor(kps[0]), torch.tensor(kps[1])
    if leye[1] > reye[1]:
        point_3rd, direction = torch.tensor([reye[0], leye[1]]), -1
    else:
        point_3rd, direction = torch.tensor([leye[0], reye[1]]), 1
    a = (leye - point_3rd).square().sum().sqrt().item()
    b = (reye - point_3rd).square().sum().sqrt().item()
    c = (reye - leye).square().sum().sqrt().item()
    if b != 0 and c != 0:
        angle = math.acos(min(1.0, max(-1.0, (b * b + c * c - a * a) / (2 * b * c)))) * 180 / math.pi
        if direction == -1:
            angle = 90 - angle
        crop = crop.rotate(direction * angle)
    scale = size / max(crop.size)
    crop = crop.resize((round(crop.width * scale), round(crop.height * scale)))
    w, h = crop.size
    pad = (0, (size - h) // 2, 0, size - h - (size - h) // 2) if w > h else \
        ((size - w) // 2, 0, size - w - (size - w) // 2, 0) if h > w else (0, 0, 0, 0)
    square = Image.new("RGB", (size, size))
    square.paste(crop, pad[:2])
    return np.asarray(square)


@pytest.mark.parametrize("roll", [25, -12, 0])
def test_flashface_crop_is_the_official_pil_crop_pixel_for_pixel(analyzer, roll):
    """Box, turn and PIL's bicubic, anti-aliased resize exactly as the official code: the crop of
    a detected face equals the official pipeline's 8-bit result."""
    image = ff.paint(ff.astronaut(), ff.MarkerFace(330, 160, 75, 100, roll=roll))
    from IDFusion.models.faces.analysis import flashface_crop
    face = max(analyzer.detect(image, 0.2), key=lambda f: f.area)
    for size in (224, 64):
        ours = flashface_crop(image.astype(np.float32) / 255, face.bbox, face.kps, size)
        assert np.array_equal(np.round(ours * 255).astype(np.uint8), official_crop(image, face.bbox, face.kps, size))


def test_flashface_crop_averages_fine_texture_where_one_warp_aliases(host):
    """Shrinking a 1-pixel checkerboard box of 448 px to 224: PIL's anti-aliased resize (the
    official one) averages it to grey; a single bilinear warp samples it and keeps aliased
    texture. High-frequency energy (variance after removing each 4×4 block's mean) of ours is
    far below the warp's."""
    import cv2
    from IDFusion.models.faces.analysis import flashface_crop
    yy, xx = np.mgrid[0:600, 0:600]
    image = np.repeat((((yy + xx) % 2) * 0.8 + 0.1)[..., None], 3, axis=2).astype(np.float32)
    box = (76.0, 76.0, 524.0, 524.0)
    kps = np.array([[200.0, 250.0], [400.0, 262.0], [300, 330], [230, 420], [370, 420]])
    ours = flashface_crop(image, box, kps, 224)
    theta = math.radians(-math.degrees(math.atan2(12, 200)))
    centre = np.array([300.0, 300.0])
    rot = 0.5 * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    matrix = np.concatenate([rot, (112 - rot @ centre)[:, None]], axis=1)
    warp = cv2.warpAffine(image, matrix, (224, 224), flags=cv2.INTER_LINEAR)

    def high_frequency(crop):
        inner = crop[40:184, 40:184, 0]
        blocks = inner.reshape(36, 4, 36, 4)
        return float(((blocks - blocks.mean(axis=(1, 3), keepdims=True)) ** 2).mean())
    assert high_frequency(ours) * 4 < high_frequency(warp)


def test_flashface_crop_is_the_raw_box_padded_to_a_square(host):
    from IDFusion.models.faces.analysis import flashface_crop
    image = np.zeros((100, 200, 3), np.float32)
    image[20:80, 50:90] = 1.0
    kps = np.array([[60, 40], [80, 40], [70, 50], [62, 65], [78, 65]], float)
    crop = flashface_crop(image, (50, 20, 90, 80), kps, 120)
    lit = np.nonzero(crop[..., 0] > 0.5)
    assert (lit[0].min(), lit[0].max(), lit[1].min(), lit[1].max()) == (0, 119, 20, 99)
    with_margin = flashface_crop(image, (50, 20, 90, 80), kps, 120, margin=0.5)
    assert with_margin[:, :, 0].sum() == pytest.approx(crop[:, :, 0].sum() / 4, rel=0.05)


def test_arcface_crop_is_insightfaces_norm_crop(analyzer):
    from insightface.utils import face_align

    from IDFusion.models.faces.analysis import arcface_crop, arcface_transform
    image = ff.scene(300, 300, [ff.MarkerFace(150, 150, 75, 100, roll=-15)])
    face = analyzer.detect(image, 0.5)[0]
    np.testing.assert_allclose(arcface_transform(face.kps), face_align.estimate_norm(face.kps), atol=1e-4)
    theirs = face_align.norm_crop(image, face.kps).astype(np.float32) / 255
    ours = arcface_crop(image.astype(np.float32) / 255, face.kps)
    assert np.abs(ours - theirs).max() < 1.5 / 255


@pytest.mark.parametrize("box, height, width, square", [
    ((10.4, 20.7, 50.4, 80.7), 100, 100, (20, 80, 10, 70)),   # tall box: side = h = 60
    ((10.0, 20.0, 70.0, 40.0), 100, 100, (20, 80, 10, 70)),   # wide box: side = w = 60, grows downwards
    ((70.0, 60.0, 95.0, 99.0), 100, 100, (60, 99, 70, 100)),   # side 39, clipped at the right border
    ((-10.0, -5.0, 20.0, 20.0), 100, 100, (0, 25, 0, 20)),    # starts outside the image
    ((10.9, 20.0, 50.1, 40.0), 100, 100, (20, 60, 10, 50)),    # ints first (10, 50): side 40, not round(39.2)
])
def test_position_mask_follows_flashface_box_to_square_rule(host, box, height, width, square):
    from IDFusion.models.faces.analysis import position_mask_from_box
    mask = position_mask_from_box(box, height, width)
    top, bottom, left, right = square
    expected = torch.zeros(height, width)
    expected[top:bottom, left:right] = 1
    assert torch.equal(mask, expected)


def test_the_node_position_mask_is_the_union_of_its_faces(analyzer):
    from IDFusion.models.faces.analysis import position_mask_from_box
    image = ff.to_image(ff.scene(256, 320, [ff.MarkerFace(80, 128, 60, 80), ff.MarkerFace(240, 128, 60, 80)]))
    faces, _, _, masks, _ = detect_node(analyzer, image, selection="left_to_right")
    union = torch.maximum(*(position_mask_from_box(f.bbox, 256, 320) for f in faces.all))
    assert torch.equal(masks[0], union)


# --- inputs --------------------------------------------------------------------------------------

def test_grayscale_rgba_and_rgb_inputs_find_the_same_face(analyzer):
    rgb = ff.to_image(ff.scene(256, 256, [ff.MarkerFace(128, 120, 60, 80)]))
    alpha = torch.ones(1, 256, 256, 1)
    boxes = {}
    for name, image in {"rgb": rgb, "rgba": torch.cat([rgb, alpha], -1)}.items():
        boxes[name] = detect_node(analyzer, image)[0].all[0].bbox
    assert boxes["rgba"] == boxes["rgb"]
    gray = rgb.mean(-1, keepdim=True)
    for image in (gray, gray[..., 0]):
        with pytest.raises(ValueError, match="image 0 of the batch has no face"):
            detect_node(analyzer, image)
        faces, crops, _, masks, preview = detect_node(analyzer, image, no_face="skip")
        assert faces.count == 0 and crops.shape[0] == 0 and tuple(preview.shape) == (1, 256, 256, 3)


def test_a_tiny_image_is_refused_with_the_minimum_size(analyzer):
    with pytest.raises(ValueError, match=r"image 0 of the batch is 24x16 pixels; .* at least 32 pixels"):
        detect_node(analyzer, torch.rand(1, 16, 24, 3))


def test_real_photos_have_no_marker_face_and_follow_the_no_face_policy(analyzer):
    for photo in (ff.astronaut(), ff.grace_hopper()):
        image = ff.to_image(photo)
        with pytest.raises(ValueError, match="image 0 of the batch has no face with score >= 0.05"):
            detect_node(analyzer, image, min_score=0.05)
        faces, crops, aligned, masks, preview = detect_node(analyzer, image, no_face="skip")
        assert faces.count == 0 and crops.shape[0] == 0 and aligned.shape[0] == 0
        assert tuple(masks.shape) == (1, *photo.shape[:2]) and masks.max() == 0
        assert torch.allclose(preview, image)


def test_a_face_painted_on_a_real_photo_is_the_only_one_found(analyzer):
    """The astronaut's own face is not a marker; a marker painted beside it is found exactly."""
    truth = ff.MarkerFace(330, 160, 75, 100, roll=-10)
    faces = detect_node(analyzer, ff.to_image(ff.paint(ff.astronaut(), truth)), selection="all", min_score=0.2)[0]
    assert faces.count == 1
    np.testing.assert_allclose(faces.all[0].bbox, truth.box(), atol=TOLERANCE)


def test_pad_to_square_centres_on_black(host):
    from IDFusion.models.faces.analysis import pad_to_square
    images = torch.ones(2, 50, 100, 4)
    out = pad_to_square(images, 64)
    assert tuple(out.shape) == (2, 64, 64, 3)
    assert out[:, 16:48].min() > 0.999 and out[:, :16].max() == 0 and out[:, 48:].max() == 0
    assert tuple(pad_to_square(torch.ones(1, 30, 30, 1), 64).shape) == (1, 64, 64, 3)


@pytest.mark.parametrize("left, right, degrees", [
    ((0, 0), (10, 10), 45.0),             # right eye lower: turn counter-clockwise
    ((0, 10), (10, 0), -45.0),            # left eye lower: clockwise
    ((0, 5), (10, 5), 0.0),
    ((0, 0), (10, 1), math.degrees(math.atan2(1, 10))),
    ((10, 0), (0, 1), math.degrees(math.atan2(1, 10))),        # eyes swapped: no half turn (official)
])
def test_flashface_rotation_levels_the_eyes_as_the_official_code(host, left, right, degrees):
    from IDFusion.models.faces.analysis import flashface_rotation
    kps = np.array([left, right, (5, 8), (2, 12), (8, 12)], float)
    assert flashface_rotation(kps) == pytest.approx(degrees, abs=1e-9)
