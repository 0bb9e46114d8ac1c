"""Face parsing: facexlib's own loaders read the fixture weights offline, and IDFusion Face
Parse turns BiSeNet's labels into region masks and a preview (random weights: the labels
mean nothing, the bookkeeping is exact)."""
import numpy as np
import pytest
import torch

from idf_testlib import face_fixtures as ff


@pytest.fixture(scope="module")
def weights(host):
    return ff.facexlib_weights()


@pytest.fixture(scope="module")
def parser(weights):
    from IDFusion.models.faces.parsing import load_parser
    return load_parser("parsing_bisenet.pth")


@pytest.fixture
def no_downloads(monkeypatch):
    import facexlib.utils.misc as misc

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"facexlib tried to download {url}")
    monkeypatch.setattr(misc, "download_url_to_file", refuse)


def photos() -> torch.Tensor:
    """The astronaut and Grace Hopper (her top 512 rows) as one IMAGE batch [2, 512, 512, 3]."""
    return ff.to_image(ff.astronaut(), ff.grace_hopper()[:512])


def parse_node(parser, image, labels=""):
    from IDFusion.nodes.faces import FaceParse
    return FaceParse.execute(parser, image, labels).result


def test_facexlib_loaders_read_the_fixture_files_offline(weights, no_downloads):
    from facexlib.detection import init_detection_model
    from facexlib.parsing import init_parsing_model
    bisenet = init_parsing_model("bisenet", device="cpu", model_rootpath=str(weights))
    retinaface = init_detection_model("retinaface_resnet50", device="cpu", model_rootpath=str(weights))
    for model, name in ((bisenet, "parsing_bisenet.pth"), (retinaface, "detection_Resnet50_Final.pth")):
        saved = torch.load(weights / name, weights_only=True)
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_the_parser_is_facexlibs_bisenet_with_the_files_weights(weights, parser, no_downloads):
    import comfy.model_patcher
    import torch.nn.functional as F
    from facexlib.parsing import init_parsing_model

    from IDFusion.models.faces.parsing import MEAN, STD
    assert isinstance(parser.patcher, comfy.model_patcher.ModelPatcher)
    reference = init_parsing_model("bisenet", device="cpu", model_rootpath=str(weights))
    image = photos()[0]
    x = F.interpolate(image.movedim(-1, 0)[None], size=(512, 512), mode="bilinear", antialias=True)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    expected = reference(x)[0][0].argmax(0)
    assert (parser.parse(image) == expected).float().mean() > 0.999


def test_region_masks_and_preview_follow_the_labels_of_real_photos(parser):
    from IDFusion.models.faces.parsing import LABELS, PALETTE, REGIONS
    image = photos()
    *regions, selected, preview = parse_node(parser, image, "hair, 4, l_lip")
    labels = torch.stack([parser.parse(im) for im in image])
    assert len(regions) == len(REGIONS)
    for mask, ids in zip(regions, REGIONS.values()):
        assert tuple(mask.shape) == (2, 512, 512)
        assert torch.equal(mask, torch.isin(labels, torch.tensor(ids)).float())
    assert torch.equal(selected, torch.isin(labels, torch.tensor([LABELS.index("hair"), 4, 13])).float())
    torch.testing.assert_close(preview, 0.5 * image + 0.5 * PALETTE[labels])


def test_all_nineteen_labels_cover_every_pixel_once(parser):
    outputs = parse_node(parser, photos()[:1], ", ".join(str(i) for i in range(19)))
    skin, hair, everything = outputs[0], outputs[6], outputs[-2]
    assert torch.equal(everything, torch.ones(1, 512, 512))
    assert (skin * hair).max() == 0


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_rgba_images_are_parsed(parser, channels):
    image = torch.rand(1, 96, 128, channels)
    outputs = parse_node(parser, image)
    assert tuple(outputs[0].shape) == (1, 96, 128) and tuple(outputs[-1].shape) == (1, 96, 128, 3)


def test_labels_by_name_or_number_and_a_bad_one_is_named(parser):
    from IDFusion.models.faces.parsing import parse_label_list
    assert parse_label_list("hair, 4,l_lip ,") == (17, 4, 13)
    with pytest.raises(ValueError, match="IDFusionFaceParse: labels: 'nostril' is not a face-parsing label: .* hair"):
        parse_node(parser, torch.rand(1, 64, 64, 3), "hair, nostril")


def test_missing_weights_say_where_to_put_facexlibs_file(host, monkeypatch, tmp_path, no_downloads):
    import folder_paths

    from IDFusion.models.faces.parsing import load_parser
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facexlib", ([str(tmp_path)], set()))
    with pytest.raises(FileNotFoundError, match=f"parsing_bisenet.pth.* in {tmp_path}. IDFusion never downloads"):
        load_parser("parsing_bisenet.pth")


def test_a_file_that_is_not_bisenet_is_refused(weights, monkeypatch, tmp_path):
    import shutil

    import folder_paths

    from IDFusion.models.faces.parsing import load_parser, model_names
    shutil.copy(weights / "detection_Resnet50_Final.pth", tmp_path / "parsing_other.pth")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facexlib", ([str(tmp_path)], set()))
    assert "parsing_other.pth" in model_names()
    with pytest.raises(ValueError, match="parsing_other.pth is not a facexlib BiSeNet face-parsing model"):
        load_parser("parsing_other.pth")


def test_parsing_runs_on_detected_face_crops(parser):
    """The intended wiring: Face Detect's crops into Face Parse."""
    ff.insightface_pack("antelopev2")
    from IDFusion.models.faces.analysis import load_analyzer
    from IDFusion.nodes.faces import FaceDetect
    analyzer = load_analyzer("antelopev2", "CPU", 320)
    image = ff.to_image(ff.paint(ff.astronaut(), ff.MarkerFace(230, 130, 90, 120)))
    crops = FaceDetect.execute(analyzer, image, "largest", 0, 0.5, "error", 224, 0.0).result[1]
    outputs = parse_node(parser, crops)
    assert tuple(outputs[0].shape) == (1, 224, 224)
    assert np.isin(outputs[7].unique().numpy(), [0.0, 1.0]).all()
