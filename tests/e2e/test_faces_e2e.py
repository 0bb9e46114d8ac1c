"""The face nodes through the ComfyUI server's HTTP API: detection, identity, landmarks and
parsing in one prompt; user mistakes end in an execution error that names the problem,
and the server keeps serving."""
import shutil

import numpy as np
import pytest
from PIL import Image

from idf_testlib import face_fixtures as ff
from idf_testlib.server import execution_error

FACE_NODES = {
    "IDFusionFaceAnalysisLoader": "IDFusion/loaders",
    "IDFusionFaceParsingLoader": "IDFusion/loaders",
    "IDFusionFaceDetect": "IDFusion/faces",
    "IDFusionFaceParse": "IDFusion/faces",
    "IDFusionIdentity": "IDFusion/identity",
    "IDFusionLandmarkPredictor": "IDFusion/landmarks",
}
SOURCE = ff.MarkerFace(160, 170, 100, 130)
DRIVING = ff.MarkerFace(230, 150, 80, 110, roll=20)


@pytest.fixture(scope="module")
def inputs(server):
    """Model fixtures, and photos in the server's input folder."""
    ff.insightface_pack("antelopev2")
    ff.facexlib_weights()
    folder = server.workdir / "input"
    images = {
        "idf_source.png": ff.scene(340, 320, [SOURCE]),
        "idf_driving.png": ff.scene(300, 420, [DRIVING], seed=2),
        "idf_astronaut.png": ff.astronaut(),
        "idf_hopper.png": ff.grace_hopper(),
        "idf_small_source.png": ff.scene(200, 180, [ff.MarkerFace(90, 100, 60, 80)], seed=3),
        "idf_two_faces.png": ff.scene(240, 400, [ff.MarkerFace(100, 120, 60, 80), ff.MarkerFace(300, 120, 75, 100)]),
    }
    for name, array in images.items():
        Image.fromarray(array).save(folder / name)
    Image.fromarray(np.ones((16, 24, 3), np.uint8) * 128).save(folder / "idf_tiny.png")
    rgba = np.concatenate([images["idf_source.png"], np.full((340, 320, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "idf_source_rgba.png")
    Image.fromarray(images["idf_source.png"]).convert("L").save(folder / "idf_source_gray.png")
    return folder


def load(image: str) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": image}}


def detect(analyzer: str, image: str, no_face: str = "error", selection: str = "largest", index: int = 0) -> dict:
    return {"class_type": "IDFusionFaceDetect", "inputs": {
        "analyzer": [analyzer, 0], "image": [image, 0], "selection": selection, "index": index, "min_score": 0.5,
        "no_face": no_face, "crop_size": 224, "margin": 0.0}}


def analyzer_node(pack: str = "antelopev2") -> dict:
    return {"class_type": "IDFusionFaceAnalysisLoader", "inputs": {"pack": pack, "provider": "auto", "det_size": 320}}


def save(images: list, prefix: str) -> dict:
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def saved(server, entry, node: str) -> list[Image.Image]:
    return [ff.view_image(server, image) for image in entry["outputs"].get(node, {}).get("images", [])]


def detect_prompt(image: str, no_face: str = "error", pack: str = "antelopev2", **selection) -> dict:
    return {"1": analyzer_node(pack), "2": load(image), "3": detect("1", "2", no_face, **selection),
            "4": save(["3", 4], "idf_detect")}


def test_face_nodes_are_listed_where_the_contract_puts_them(server):
    info = server.object_info()
    for node, category in FACE_NODES.items():
        assert info[node]["category"] == category
        assert info[node]["display_name"].startswith("IDFusion")
        specs = {**info[node]["input"]["required"], **info[node]["input"].get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in specs.values()), node
    assert "antelopev2" in info["IDFusionFaceAnalysisLoader"]["input"]["required"]["pack"][1]["options"]


def test_detect_identity_landmarks_and_parsing_in_one_prompt(server, inputs):
    prompt = {
        "1": analyzer_node(),
        "2": load("idf_source.png"), "3": detect("1", "2"),
        "4": load("idf_driving.png"), "5": detect("1", "4"),
        "6": {"class_type": "IDFusionIdentity", "inputs": {"faces": ["3", 0], "label": "A", "size": 224}},
        "7": save(["6", 1], "idf_identity"),
        "8": {"class_type": "IDFusionLandmarkPredictor", "inputs": {
            "source": ["3", 0], "driving": ["5", 0], "style": "instantid_kps", "expression": 1.0}},
        "9": save(["8", 0], "idf_control"),
        "10": {"class_type": "IDFusionFaceParsingLoader", "inputs": {"model": "parsing_bisenet.pth"}},
        "11": {"class_type": "IDFusionFaceParse", "inputs": {"parser": ["10", 0], "image": ["3", 1], "labels": "hair"}},
        "12": save(["11", 9], "idf_parsing"),
        "13": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 3]}},
        "14": save(["13", 0], "idf_position"),
    }
    entry = server.run(prompt)
    assert execution_error(entry) is None
    identity, = saved(server, entry, "7")
    control, = saved(server, entry, "9")
    parsing, = saved(server, entry, "12")
    position, = saved(server, entry, "14")
    assert identity.size == (224, 224) and parsing.size == (224, 224)
    assert control.size == (420, 300) and np.asarray(control).max() == 255
    square = np.asarray(position.convert("L")) > 127
    rows, cols = np.nonzero(square)
    x1, y1, x2, y2 = DRIVING.box()
    assert abs(cols.min() - x1) <= 2 and abs(rows.min() - y1) <= 2
    assert cols.max() - cols.min() + 1 == rows.max() - rows.min() + 1  # FlashFace's square
    for node in ("5", "8", "11"):
        assert entry["outputs"][node]["images"], f"node {node} shows no preview"


@pytest.mark.parametrize("image, message", [
    ("idf_astronaut.png", "IDFusionFaceDetect: image 0 of the batch has no face with score >= 0.5; lower min_score or "
                          "use a clearer photo, or set no_face to 'skip'"),
    ("idf_tiny.png", "IDFusionFaceDetect: image 0 of the batch is 24x16 pixels; face detection needs at least "
                     "32 pixels"),
])
def test_bad_photos_fail_with_their_reason_and_the_server_keeps_serving(server, inputs, image, message):
    entry = server.run(detect_prompt(image))
    assert message in (execution_error(entry) or "")
    entry = server.run(detect_prompt("idf_source.png"))
    assert execution_error(entry) is None and len(saved(server, entry, "4")) == 1


@pytest.mark.parametrize("selection, index, count", [("largest", 0, 1), ("left_to_right", 0, 2), ("by_index", 1, 1)])
def test_several_faces_are_selected(server, inputs, selection, index, count):
    prompt = detect_prompt("idf_two_faces.png", selection=selection, index=index)
    prompt["5"] = save(["3", 1], "idf_two_faces")
    entry = server.run(prompt)
    assert execution_error(entry) is None and len(saved(server, entry, "5")) == count


def test_an_index_past_the_faces_fails_by_name_and_the_server_keeps_serving(server, inputs):
    entry = server.run(detect_prompt("idf_two_faces.png", selection="by_index", index=2))
    assert "image 0 of the batch has 2 face(s) with score >= 0.5, so there is no face at index 2" in (
        execution_error(entry) or "")
    assert execution_error(server.run(detect_prompt("idf_two_faces.png"))) is None


def test_skip_lets_a_faceless_real_photo_through(server, inputs):
    entry = server.run(detect_prompt("idf_hopper.png", no_face="skip"))
    assert execution_error(entry) is None
    preview, = saved(server, entry, "4")
    assert preview.size == (512, 600)


def test_a_nested_pack_is_named_and_the_server_keeps_serving(server, inputs):
    pack = ff.insightface_root() / "models" / "idf_nested"
    shutil.copytree(ff.insightface_pack("antelopev2"), pack / "idf_nested")
    try:
        entry = server.run(detect_prompt("idf_source.png", pack="idf_nested"))
        error = execution_error(entry) or ""
        assert "insightface pack 'idf_nested' is nested one folder too deep" in error
        assert f"move the files from {pack / 'idf_nested'} up into {pack}" in error
    finally:
        shutil.rmtree(pack)
    assert execution_error(server.run(detect_prompt("idf_source.png"))) is None


@pytest.mark.parametrize("image, crops", [("idf_source_rgba.png", 1), ("idf_source_gray.png", 0)])
def test_rgba_and_grayscale_files(server, inputs, image, crops):
    """LoadImage gives RGB for both; the grayscale copy has lost the marker's colour, so no face."""
    prompt = {"1": analyzer_node(), "2": load(image), "3": detect("1", "2", no_face="skip"),
              "4": {"class_type": "IDFusionIdentity", "inputs": {"faces": ["3", 0], "label": "A", "size": 224}},
              "5": save(["4", 1], "idf_rgba")}
    entry = server.run(prompt)
    if crops:
        assert execution_error(entry) is None and len(saved(server, entry, "5")) == 1
    else:
        assert "IDFusionIdentity: there is no face to build the identity from" in (execution_error(entry) or "")


def test_reference_photos_of_different_sizes_make_one_identity(server, inputs):
    prompt = {"1": analyzer_node(),
              "2": load("idf_source.png"), "3": detect("1", "2"),
              "4": load("idf_small_source.png"), "5": detect("1", "4"),
              "6": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 1], "image2": ["5", 1]}},
              "7": {"class_type": "IDFusionIdentity", "inputs": {"crops": ["6", 0], "label": "A", "size": 224}},
              "8": save(["7", 1], "idf_two_sizes")}
    entry = server.run(prompt)
    assert execution_error(entry) is None
    assert [im.size for im in saved(server, entry, "8")] == [(224, 224), (224, 224)]
