"""Every example workflow in workflows/ runs end to end on the test server: converted to the
API format as the frontend does, with the random-weight checkpoints in the real layouts
(full-size SD1.5, a small FlashFace checkpoint with the official key names, synthetic
insightface packs, ConsistentID and CLIP-ViT-H, small Flux.1 and Flux.2 with full-size VAEs) under
the model file names the workflows use, and marker photos under the sample photos' names (the
``prepared`` fixture), at the test host's small sizes and 2 steps. Workflows that need a newer
ComfyUI (``workflows.MIN_COMFYUI``: the DiT ones) run on the hosts that have it.
Output images: ``output-<name>.png`` in the artifacts folder."""
import pytest
from PIL import Image

from idf_testlib import prepared as ready
from idf_testlib import workflows
from idf_testlib.paths import comfy_version
from idf_testlib.server import execution_error

SIZE = workflows.TEST_IMAGE_SIZE


#: Workflows whose end-to-end run lives in a test of their own, with more assertions.
DEDICATED = {"pose_driven_personalization.json": "test_faces_workflow.py",
             "flux2_klein_two_people.json": "test_dit_workflows.py",
             "flux1_dev_training_free.json": "test_dit_workflows.py"}


def skip_unless_the_host_runs(name: str) -> None:
    """Workflows declared in ``workflows.MIN_COMFYUI`` need a newer host: skipped below it, by name."""
    if not workflows.runs_on(name, comfy_version()):
        pytest.skip(f"{name} needs {workflows.needs_text(name)}; this host is {'.'.join(map(str, comfy_version()))}")


@pytest.mark.parametrize("name", [n for n in workflows.names() if n not in DEDICATED])
def test_workflow_runs_end_to_end(server, prepared, artifacts, name):
    skip_unless_the_host_runs(name)
    info = server.object_info()
    prompt = ready.finish(workflows.to_api(workflows.load(name), info, prepared))
    entry = server.run(prompt, timeout=900)
    assert execution_error(entry) is None, f"{name}: {execution_error(entry)}\n{server.log_tail(3000)}"
    saved = [p for p in server.output_images(entry) if "IDFusion" in str(p)]
    assert saved, f"{name} saved no image"
    for path in saved:
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE)
            image.save(artifacts / f"output-{name.removesuffix('.json')}.png")


def test_dedicated_workflow_tests_exist():
    from pathlib import Path
    for name, test_file in DEDICATED.items():
        assert name in workflows.names() and (Path(__file__).parent / test_file).is_file()


def test_every_workflow_uses_only_nodes_the_host_has(server):
    info = server.object_info()
    for name in (n for n in workflows.names() if workflows.runs_on(n, comfy_version())):
        missing = {n["type"] for n in workflows.load(name)["nodes"]} - set(info) - workflows.NOTE_TYPES
        assert not missing, f"{name} uses unknown nodes {missing}"
