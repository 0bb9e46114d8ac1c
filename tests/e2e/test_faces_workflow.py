"""workflows/pose_driven_personalization.json end to end on the test host: the example graph,
converted to the API format as the frontend does, with the test host's models (random SD1.5
checkpoint and ControlNet, the synthetic insightface pack), painted photos and a small size."""
import numpy as np
import pytest
from PIL import Image

from idf_testlib import face_fixtures as ff
from idf_testlib import workflows
from idf_testlib.models import SD15_CHECKPOINT
from idf_testlib.server import execution_error

WORKFLOW = "pose_driven_personalization.json"
SIZE = 64
REFERENCE_SIZE = 64
SOURCE = ff.MarkerFace(160, 170, 100, 130)
DRIVING = ff.MarkerFace(160, 150, 90, 120, roll=-15)


def host_values(node_type: str, name: str, value):
    """The example's values, with what the test host has (models, size, steps) swapped in."""
    swaps = {
        ("CheckpointLoaderSimple", "ckpt_name"): SD15_CHECKPOINT,
        ("ControlNetLoader", "control_net_name"): ff.CONTROLNET,
        ("IDFusionFaceAnalysisLoader", "det_size"): 320,
        ("ImageScale", "width"): SIZE, ("ImageScale", "height"): SIZE,
        ("EmptyLatentImage", "width"): SIZE, ("EmptyLatentImage", "height"): SIZE,
        ("KSampler", "steps"): 2,
        ("IDFusionIdentity", "size"): REFERENCE_SIZE, ("IDFusionFaceFeatures", "size"): REFERENCE_SIZE,
    }
    return swaps.get((node_type, name), value)


@pytest.fixture(scope="module")
def prompt(server, sd15_checkpoint):
    ff.insightface_pack("antelopev2")
    ff.sd15_controlnet()
    folder = server.workdir / "input"
    Image.fromarray(ff.scene(340, 320, [SOURCE])).save(folder / "idfusion_person_a_1.png")
    Image.fromarray(ff.scene(320, 320, [DRIVING], seed=7)).save(folder / "idfusion_driving_pose.png")
    return workflows.to_api(workflows.load(WORKFLOW), server.object_info(), host_values)


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def test_the_workflow_is_the_pose_driven_graph(prompt):
    types = {v["class_type"] for v in prompt.values()}
    assert {"IDFusionLandmarkPredictor", "ControlNetApplyAdvanced", "IDFusionReferenceAttention",
            "IDFusionIdentity", "IDFusionFaceFeatures", "KSampler"} <= types
    landmarks = prompt[node_of(prompt, "IDFusionLandmarkPredictor")]["inputs"]
    control = prompt[node_of(prompt, "ControlNetApplyAdvanced")]["inputs"]
    attention = prompt[node_of(prompt, "IDFusionReferenceAttention")]["inputs"]
    assert control["image"][0] == node_of(prompt, "IDFusionLandmarkPredictor")
    assert attention["position_mask"][0] == landmarks["driving"][0]  # the face goes where the driving face is


def test_the_workflow_runs_end_to_end(server, prompt, artifacts):
    entry = server.run(prompt)
    assert execution_error(entry) is None
    images = server.output_images(entry)
    generated = [p for p in images if p.name.startswith("pose_driven")]
    assert len(generated) == 1
    with Image.open(generated[0]) as image:
        assert image.size == (SIZE, SIZE)
        image.save(artifacts / "e2e-pose-driven.png")
    control = ff.view_image(server, entry["outputs"][node_of(prompt, "IDFusionLandmarkPredictor")]["images"][0])
    dots = np.asarray(control.convert("L")) > 127
    assert control.size == (SIZE, SIZE) and 20 < dots.sum() < 0.3 * SIZE * SIZE  # 68 white dots, a face's worth
