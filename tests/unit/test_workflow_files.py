"""The example workflows as files (workflows/*.json, written by tools/make_workflows.py): laid out
in titled stage groups read left to right, no two nodes overlapping at their saved sizes, a note on
what to set first, a saved view of the whole graph, the shipped sample photos, a thumbnail.

The browser tier checks the same layout as the frontend draws it (tests/browser/test_templates.py);
these checks need no host."""
import pytest
from PIL import Image

from idf_testlib import layout, workflows
from idf_testlib.paths import ROOT

NAMES = [name.removesuffix(".json") for name in workflows.names()]
SAMPLES = {path.name for path in (ROOT / "samples").iterdir()}
STAGE_TITLES = {stage.title for stage in layout.STAGES.values()}


def rect(node: dict) -> list[float]:
    return layout.node_rect(node["pos"], node["size"])


def inside(inner, outer) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def meet(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def graph_nodes(workflow: dict) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] not in workflows.NOTE_TYPES]


@pytest.fixture(params=NAMES)
def workflow(request) -> dict:
    return workflows.load(f"{request.param}.json")


def test_there_are_examples_for_every_use():
    assert {"flashface_four_references", "flashface_face_swap", "flashface_character_to_real",
            "two_person_masks", "pose_driven_personalization"} <= set(NAMES)


def test_no_two_nodes_overlap(workflow):
    nodes = workflow["nodes"]
    pairs = [(a["id"], b["id"]) for i, a in enumerate(nodes) for b in nodes[i + 1:] if meet(rect(a), rect(b))]
    assert pairs == []


def test_every_node_stands_in_one_titled_stage_group(workflow):
    groups = workflow["groups"]
    assert groups and {g["title"] for g in groups} <= STAGE_TITLES
    homes = {n["id"]: [g["title"] for g in groups if inside(rect(n), g["bounding"])] for n in graph_nodes(workflow)}
    assert {node_id: titles for node_id, titles in homes.items() if len(titles) != 1} == {}
    assert not [(a["title"], b["title"]) for i, a in enumerate(groups) for b in groups[i + 1:]
                if meet(a["bounding"], b["bounding"])]


def test_every_wire_runs_left_to_right(workflow):
    nodes = {n["id"]: n for n in workflow["nodes"]}
    backwards = [(src, dst) for _, src, _, dst, _, _ in workflow["links"]
                 if nodes[src]["pos"][0] + nodes[src]["size"][0] >= nodes[dst]["pos"][0]]
    assert backwards == []


def test_a_note_on_top_says_what_to_set_first(workflow):
    notes = [n for n in workflow["nodes"] if n["type"] in workflows.NOTE_TYPES]
    assert len(notes) == 1 and "Set first" in notes[0]["widgets_values"][0]
    assert rect(notes[0])[1] + rect(notes[0])[3] <= min(g["bounding"][1] for g in workflow["groups"])


def test_the_saved_view_shows_the_whole_graph(workflow):
    """screen = (graph + offset) * scale; everything within the window the view was fitted to."""
    scale, (dx, dy) = workflow["extra"]["ds"]["scale"], workflow["extra"]["ds"]["offset"]
    right, bottom = (m + s for m, s in zip(layout.VIEW_MARGIN, layout.VIEW_SIZE))
    for x, y, w, h in [rect(n) for n in workflow["nodes"]] + [g["bounding"] for g in workflow["groups"]]:
        assert 0 <= (x + dx) * scale and (x + w + dx) * scale <= right + 1
        assert 0 <= (y + dy) * scale and (y + h + dy) * scale <= bottom + 1


def test_photos_are_the_shipped_samples(workflow):
    photos = {n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadImage"}
    assert photos and photos <= SAMPLES


@pytest.mark.parametrize("name", NAMES)
def test_each_workflow_has_a_square_thumbnail(name):
    with Image.open(workflows.WORKFLOWS / f"{name}.jpg") as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == (512, 512)


def test_sample_photos_are_the_public_domain_files_they_name():
    """samples/ holds scikit-image's astronaut and matplotlib's Grace Hopper byte for byte, and the
    character drawn from the Grace Hopper photo at its size (tools/make_samples.py)."""
    import matplotlib
    import skimage
    from pathlib import Path
    folder = ROOT / "samples"
    astronaut = Path(skimage.__file__).parent / "data" / "astronaut.png"
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    assert (folder / "idfusion_astronaut.png").read_bytes() == astronaut.read_bytes()
    assert (folder / "idfusion_grace_hopper.jpg").read_bytes() == hopper.read_bytes()
    with Image.open(folder / "idfusion_character.png") as drawn, Image.open(hopper) as photo:
        assert drawn.size == photo.size
    assert SAMPLES == {"idfusion_astronaut.png", "idfusion_grace_hopper.jpg", "idfusion_character.png"}


def test_a_node_never_stands_left_of_its_inputs():
    """Layout rules on a made-up graph: a node whose own stage lies left of an input's moves into
    that stage; a node fed from its own stage stands in the next sub-column."""
    loader = layout.Box(1, "models", (300, 100), [])
    photo = layout.Box(2, "photos", (300, 300), [])
    faces = layout.Box(3, "faces", (300, 200), [loader, photo])
    early = layout.Box(4, "photos", (300, 100), [faces])          # its table says photos, it takes faces
    later = layout.Box(5, "faces", (300, 100), [early])
    groups = layout.place([loader, photo, faces, early, later])
    assert early.stage == "faces" and (faces.subcolumn, early.subcolumn, later.subcolumn) == (0, 1, 2)
    assert loader.x == photo.x < faces.x < early.x < later.x
    assert photo.y > loader.bottom
    assert [g["title"] for g in groups] == [layout.STAGES[key].title for key in ("models", "photos", "faces")]


def test_unknown_node_types_get_a_stage_from_their_category():
    assert layout.stage_of("IDFusionConsistentIDLoader", "IDFusion/loaders") == "models"
    assert layout.stage_of("SomePackDetector", "IDFusion/faces") == "faces"
    assert layout.stage_of("KSamplerX", "sampling/custom") == "sampling"
    assert layout.stage_of("Anything", "somewhere") == "model"
