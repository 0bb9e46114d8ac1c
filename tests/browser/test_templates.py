"""Every example workflow opened from the frontend's Templates menu as a person would, run with
Run unchanged, and its output image shown; laid out so that no two nodes overlap as the frontend
draws them, in both renderers, before and after the run; its saved view showing the whole graph.

The server is the ``prepared`` test server: the fixtures under the model file names the templates
use, marker photos under the sample photos' names (idf_testlib/prepared.py).

Affordable runs: the templates ship real settings (512–768 px, 25 steps). On this 2-core CPU
one call of a full-size SD1.5 UNet at 768 px takes about 55 s and a 768-px VAE decode 80 s, so
a 25-step template with reference guidance would take over an hour; and ComfyUI recognises an
SD1.5 checkpoint only with the full 320-channel UNet (``supported_models.SD15``), so no smaller
file can stand under the real checkpoint name. The test therefore changes nothing in the
frontend: when Run is pressed it takes the prompt the frontend sends, checks that it is the
template exactly as shipped (``workflows.to_api`` of the file, every input), and forwards it to
the server with the test host's small sizes and 2 steps (``prepared.shrink``), the values the
e2e tier runs.

Artifacts per template: ``template-<name>-opened.png`` (opened from the menu),
``template-<name>-run.png`` (after the run, canvas renderer), ``template-<name>-run-vue.png``
(the same in the Vue-node renderer) and ``template-<name>-layout.json`` (overlap counts).
"""
import json
import time

import pytest

from idf_testlib import prepared as ready
from idf_testlib import workflows
from idf_testlib.browser import RENDERERS, overlaps
from idf_testlib.paths import PACK
from idf_testlib.server import execution_error

NAMES = [name.removesuffix(".json") for name in workflows.names()]
RUN_TIMEOUT_S = 900
#: tools/make_workflows.py writes square thumbnails of this side (the frontend's stand-in is 224 px).
THUMBNAIL_SIDE = 512


@pytest.fixture(scope="module")
def ready_server(server, prepared):
    return server


def inputs_of(prompt: dict) -> dict:
    return {key: (node["class_type"], node["inputs"]) for key, node in prompt.items()}


def wait_for_history(server, prompt_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT_S} s:\n{server.log_tail(3000)}")


def named_overlaps(frontend, workflow: dict) -> list[str]:
    titles = {n["id"]: n.get("title") or n["type"] for n in workflow["nodes"]}
    return [f"{titles[a]} ({a}) / {titles[b]} ({b})" for a, b in overlaps(frontend.node_bounds())]


def test_templates_menu_shows_every_workflow_with_its_thumbnail(frontend, ready_server):
    cards = frontend.template_thumbnails(PACK)
    assert sorted(cards) == NAMES
    for name, picture in cards.items():
        assert picture["served"] == 200, f"{name}: the pack's thumbnail was not served ({picture})"
        assert "default-template" not in picture["src"] and picture["width"] == THUMBNAIL_SIDE, picture


@pytest.mark.parametrize("name", NAMES)
def test_template_opened_from_the_menu_runs(name, frontend, ready_server, artifacts):
    workflow = workflows.load(f"{name}.json")
    info = ready_server.object_info()
    frontend.open_from_templates_menu(name, PACK)
    frontend.screenshot(artifacts / f"template-{name}-opened.png")
    assert len(frontend.node_types()) == len(workflow["nodes"]), f"{name} is not on the canvas"
    assert frontend.problems() == []
    assert frontend.errors_found() == [], "the frontend reports missing models or images"
    counts = {"opened/canvas": named_overlaps(frontend, workflow)}

    exchange = frontend.press_run(ready.shrink)
    assert exchange["status"] == 200 and not exchange["answer"].get("node_errors"), exchange["answer"]
    assert inputs_of(exchange["sent"]) == inputs_of(workflows.to_api(workflow, info)), (
        "the frontend queued something else than the template as shipped")
    entry = wait_for_history(ready_server, exchange["answer"]["prompt_id"])
    assert execution_error(entry) is None, f"{name}: {execution_error(entry)}\n{ready_server.log_tail(3000)}"
    saved = [key for key, node in exchange["sent"].items() if node["class_type"] == "SaveImage"]
    assert saved and all(entry["outputs"].get(key, {}).get("images") for key in saved), f"{name} saved no image"
    for key in saved:
        frontend.wait_for_output(int(key))
    for renderer in RENDERERS:
        frontend.use_renderer(renderer)
        suffix = "" if renderer == "canvas" else f"-{renderer}"
        frontend.screenshot(artifacts / f"template-{name}-run{suffix}.png")
        counts[f"run/{renderer}"] = named_overlaps(frontend, workflow)
    (artifacts / f"template-{name}-layout.json").write_text(json.dumps(counts, indent=1))
    assert {step: found for step, found in counts.items() if found} == {}, "nodes overlap as drawn"


@pytest.mark.parametrize("name", NAMES)
def test_saved_view_shows_the_whole_graph(name, frontend, ready_server):
    """Opened as a file (not as a template, which the frontend fits itself), the view is the saved one
    and every node lies inside it."""
    workflow = workflows.load(f"{name}.json")
    frontend.load_graph(workflow, name, source="file")
    frontend.settle()
    view = frontend.view()
    assert view["scale"] == pytest.approx(workflow["extra"]["ds"]["scale"])
    assert view["offset"] == pytest.approx(workflow["extra"]["ds"]["offset"])
    left, top, width, height = view["visible"]
    outside = [node_id for node_id, (x, y, w, h) in frontend.node_bounds().items()
               if x < left or y < top or x + w > left + width or y + h > top + height]
    assert outside == [], f"nodes outside the saved view: {outside}"
