"""Fixtures of the e2e tier: model files and input photos on the test server."""
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
        if name == "merge_at":
            return 0.2                      # 2 steps: the text-only prompt at step 0, the facial one at step 1
        return value
    return overrides


@pytest.fixture(scope="session")
def consistentid_models(server, host):
    """Full-size ConsistentID files under their release names: ConsistentID-v1.bin (official keys and
    shapes, random), CLIP-ViT-H-14 (random, fp16), a BiSeNet as face_parsing.pth that finds every
    region, and the synthetic buffalo_l pack."""
    from idf_testlib import consistentid_fixtures as cf
    cf.full_checkpoint()
    cf.clip_vision_h()
    cf.parsing_weights()
    faces.insightface_pack("buffalo_l")


@pytest.fixture(scope="session")
def dit_prepared(server, prepared):
    """For the DiT workflows: the random-weight DiT files in place; returns the prompt maker
    ``(workflow, object_info) → API prompt`` with their file names and CLIP-L in place of the text
    encoders this machine cannot build (see ``dit_fixtures``)."""
    from idf_testlib import dit_fixtures
    dit_fixtures.all_files()

    def overrides(node_type, name, value):
        found = dit_fixtures.file_overrides(name, value)
        return prepared(node_type, name, value) if found is None else found

    def prompt(workflow: dict, info: dict) -> dict:
        from idf_testlib.workflows import to_api
        return dit_fixtures.stand_in_text_encoders(to_api(workflow, info, overrides))
    return prompt
