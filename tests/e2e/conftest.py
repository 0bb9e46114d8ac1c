"""Fixtures of the e2e tier: model files and input photos on the test server, and a second server
that never reuses reference features (what a freshly started server computes)."""
import shutil

import pytest
from PIL import Image

from idf_testlib import face_fixtures as faces
from idf_testlib.flashface_fixtures import write_tiny_checkpoint_for_sd15_clip
from idf_testlib.models import SD15_CHECKPOINT
from idf_testlib.workflows import TEST_CROP_SIZE, TEST_IMAGE_SIZE


@pytest.fixture(scope="session")
def prepared(server, sd15_checkpoint):
    """Model files and input photos in place; returns the widget overrides for the test host
    (model file names of the fixtures, small images, 2 steps, small reference crops)."""
    flashface = write_tiny_checkpoint_for_sd15_clip()
    faces.insightface_pack("antelopev2")
    faces.sd15_controlnet()
    for person, green, count in (("a", 0, 4), ("b", 20, 2)):
        for i in range(1, count + 1):
            face = faces.MarkerFace(cx=96 + 4 * i, cy=110, width=60 + 2 * i, height=80 + 2 * i, roll=3 * i, green=green)
            image = faces.scene(224, 192, [face], seed=i)
            Image.fromarray(image).save(server.workdir / "input" / f"idfusion_person_{person}_{i}.png")
    driving = faces.scene(320, 320, [faces.MarkerFace(160, 150, 90, 120, roll=-15)], seed=7)
    Image.fromarray(driving).save(server.workdir / "input" / "idfusion_driving_pose.png")

    def overrides(node_type, name, value):
        if name == "ckpt_name":
            return SD15_CHECKPOINT
        if name == "control_net_name":
            return faces.CONTROLNET
        if name == "det_size":
            return 320                      # the synthetic detector wants faces under 200 px in its input
        if name == "weights" and str(value).endswith((".ckpt", ".safetensors")):
            return flashface.name
        if name in ("width", "height"):
            return TEST_IMAGE_SIZE
        if name == "steps":
            return 2
        if name in ("size", "crop_size"):
            return TEST_CROP_SIZE
        return value
    return overrides




@pytest.fixture(scope="session")
def fresh_server(server, prepared, tmp_path_factory):
    """A second server, with the feature cache off (IDFUSION_FEATURE_CACHE_MB=0): every reference pass
    is computed afresh, so each prompt gives the picture a freshly started server gives, whatever ran
    before. Started on first use; the inputs of ``server`` are copied into it. Tests POST /free to it
    after use: two servers holding full-size models at once need more memory than small machines have."""
    from idf_testlib.server import ComfyServer
    srv = ComfyServer(tmp_path_factory.mktemp("comfy-fresh"), name="e2e-fresh", env={"IDFUSION_FEATURE_CACHE_MB": "0"})
    for photo in (server.workdir / "input").iterdir():
        if photo.is_file():
            shutil.copy(photo, srv.workdir / "input" / photo.name)
    srv.start()
    yield srv
    srv.stop()
