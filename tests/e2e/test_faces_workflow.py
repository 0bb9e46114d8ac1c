"""workflows/pose_driven_personalization.json end to end on the test host: the example graph,
converted to the API format as the frontend does, with the test host's models (random SD1.5
checkpoint and ControlNet, the synthetic insightface pack), painted photos and a small size
(the ``prepared`` fixture). Beyond test_workflows.py, it checks the graph's
wiring and the landmark image the ControlNet gets."""
import numpy as np
import pytest
from PIL import Image

from idf_testlib import face_fixtures as ff
from idf_testlib import workflows
from idf_testlib.server import execution_error

WORKFLOW = "pose_driven_personalization.json"
SIZE = workflows.TEST_IMAGE_SIZE


@pytest.fixture(scope="module")
def prompt(server, prepared):
    return workflows.to_api(workflows.load(WORKFLOW), server.object_info(), prepared)


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
