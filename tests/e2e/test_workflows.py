"""Every example workflow in workflows/ runs end to end on the test server: converted to the
API format as the frontend does, with the random-weight checkpoints in the real layouts
(full-size SD1.5, a small FlashFace checkpoint with the official key names, synthetic
insightface packs) and synthetic face photos under the names the workflows use."""
import pytest
from PIL import Image

from idf_testlib import face_fixtures as faces
from idf_testlib import workflows
from idf_testlib.flashface_fixtures import write_tiny_checkpoint_for_sd15_clip
from idf_testlib.models import SD15_CHECKPOINT
from idf_testlib.server import execution_error

SIZE = 64            # generated images: 64×64, 2 steps
CROP = 64            # reference crops: 64 px (8×8 latents) instead of 224, to keep the run short


@pytest.fixture(scope="module")
def prepared(server, sd15_checkpoint):
    """Model files and input photos in place; returns the overrides for the test host."""
    flashface = write_tiny_checkpoint_for_sd15_clip()
    faces.insightface_pack("antelopev2")
    for person, green, count in (("a", 0, 4), ("b", 20, 2)):
        for i in range(1, count + 1):
            face = faces.MarkerFace(cx=96 + 4 * i, cy=110, width=60 + 2 * i, height=80 + 2 * i, roll=3 * i, green=green)
            image = faces.scene(224, 192, [face], seed=i)
            Image.fromarray(image).save(server.workdir / "input" / f"idfusion_person_{person}_{i}.png")

    def overrides(node_type, name, value):
        if name == "ckpt_name":
            return SD15_CHECKPOINT
        if name == "weights" and str(value).endswith((".ckpt", ".safetensors")):
            return flashface.name
        if name in ("width", "height") and node_type != "IDFusionFaceAnalysisLoader":
            return SIZE
        if name == "steps":
            return 2
        if name in ("size", "crop_size"):
            return CROP
        return value
    return overrides


@pytest.mark.parametrize("name", workflows.names())
def test_workflow_runs_end_to_end(server, prepared, artifacts, name):
    info = server.object_info()
    prompt = workflows.to_api(workflows.load(name), info, prepared)
    entry = server.run(prompt, timeout=900)
    assert execution_error(entry) is None, f"{name}: {execution_error(entry)}\n{server.log_tail(3000)}"
    saved = [p for p in server.output_images(entry) if "IDFusion" in str(p)]
    assert saved, f"{name} saved no image"
    for path in saved:
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE)
            image.save(artifacts / f"workflow-{name.removesuffix('.json')}.png")


def test_every_workflow_uses_only_nodes_the_host_has(server):
    info = server.object_info()
    for name in workflows.names():
        missing = {n["type"] for n in workflows.load(name)["nodes"]} - set(info) - workflows.NOTE_TYPES
        assert not missing, f"{name} uses unknown nodes {missing}"
