"""The ComfyUI frontend in headless chromium: it loads, and every example workflow in
``workflows/`` opens through the pack's template link with all of its nodes known.

Screenshots go to the artifacts folder, named after the page or workflow."""
import json

import pytest

from idf_testlib.browser import TEMPLATE_NAME
from idf_testlib.paths import PACK, ROOT

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def bogus_workflow() -> dict:
    """A frontend-format workflow with a core node and a node type no one registers."""
    nodes = [
        {"id": 1, "type": "EmptyLatentImage", "pos": [0, 0], "size": [315, 106], "flags": {}, "order": 0,
         "mode": 0, "inputs": [], "outputs": [{"name": "LATENT", "type": "LATENT", "links": []}],
         "properties": {}, "widgets_values": [64, 64, 1]},
        {"id": 2, "type": "IDFusionNoSuchNode", "pos": [400, 0], "size": [315, 106], "flags": {}, "order": 1,
         "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []},
    ]
    return {"last_node_id": 2, "last_link_id": 0, "nodes": nodes, "links": [], "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def test_frontend_loads_and_knows_every_node(frontend, server, artifacts):
    """The page opens without errors and can build every node the host lists, the pack's included."""
    frontend.open("/")
    frontend.screenshot(artifacts / "frontend-home.png")
    assert frontend.problems() == []
    assert set(server.object_info()) - frontend.registered_node_types() == set()


def test_detectors_catch_a_missing_node_and_a_page_error(frontend):
    """Proof that the checks below can fail: a bogus node and an uncaught error are both reported."""
    frontend.open("/")
    frontend.load_graph(bogus_workflow(), "idfusion-bogus")
    with frontend.page.expect_event("pageerror"):
        frontend.page.evaluate("() => { setTimeout(() => { throw new Error('idfusion-probe') }) }")
    problems = "\n".join(frontend.problems())
    assert "missing nodes: " in problems
    assert "node type unknown to the frontend: IDFusionNoSuchNode" in problems
    assert "page error: idfusion-probe" in problems


def test_workflows_folder_has_examples():
    assert WORKFLOWS, f"{ROOT / 'workflows'} holds no example workflow (*.json): add one for every use of the pack"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_workflow_opens_with_every_node(path, frontend, server, artifacts):
    assert TEMPLATE_NAME.fullmatch(path.stem), (
        f"{path.name}: the frontend ignores ?template= names outside {TEMPLATE_NAME.pattern}: rename the file")
    workflow = json.loads(path.read_text())
    assert isinstance(workflow.get("nodes"), list), f"{path.name} is not in the frontend's format (no 'nodes' list)"
    assert path.stem in server.get("/api/workflow_templates").get(PACK, []), f"the host does not serve {path.name}"
    frontend.open_template(path.stem, PACK)
    frontend.screenshot(artifacts / f"workflow-{path.stem}.png")
    assert frontend.problems() == []
    assert len(frontend.node_types()) == len(workflow["nodes"]), f"{path.name} is not on the canvas"
