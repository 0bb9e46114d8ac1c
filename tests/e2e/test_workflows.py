"""Every example workflow in workflows/ runs end to end on the test server: converted to the
API format as the frontend does, with the random-weight checkpoints in the real layouts
(full-size SD1.5, a small FlashFace checkpoint with the official key names, synthetic
insightface packs) and synthetic face photos under the names the workflows use."""
import pytest
from PIL import Image

from idf_testlib import workflows
from idf_testlib.server import execution_error

SIZE = workflows.TEST_IMAGE_SIZE


#: Workflows whose end-to-end run lives in a test of their own, with more assertions.
DEDICATED = {"pose_driven_personalization.json": "test_faces_workflow.py"}


@pytest.mark.parametrize("name", [n for n in workflows.names() if n not in DEDICATED])
def test_workflow_runs_end_to_end(server, prepared, artifacts, name):
    info = server.object_info()
    prompt = workflows.to_api(workflows.load(name), info, prepared)
    entry = server.run(prompt, timeout=900)
    assert execution_error(entry) is None, f"{name}: {execution_error(entry)}\n{server.log_tail(3000)}"
    saved = [p for p in server.output_images(entry) if "IDFusion" in str(p)]
    assert saved, f"{name} saved no image"
    assert server.outbound() == [], f"{name}: connections that would leave the machine (socket audit)"
    assert server.stray_files() == [], f"{name}: files written outside ComfyUI's folders"
    for path in saved:
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE)
            image.save(artifacts / f"workflow-{name.removesuffix('.json')}.png")


def test_dedicated_workflow_tests_exist():
    from pathlib import Path
    for name, test_file in DEDICATED.items():
        assert name in workflows.names() and (Path(__file__).parent / test_file).is_file()


def test_every_workflow_uses_only_nodes_the_host_has(server):
    info = server.object_info()
    for name in workflows.names():
        missing = {n["type"] for n in workflows.load(name)["nodes"]} - set(info) - workflows.NOTE_TYPES
        assert not missing, f"{name} uses unknown nodes {missing}"
