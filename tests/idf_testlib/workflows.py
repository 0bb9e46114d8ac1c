"""Example workflows in the frontend's format: a builder that lays graphs out from the host's
``/object_info``, and a converter to the API format ``/prompt`` takes (as the frontend does
when you press Queue)."""
from __future__ import annotations

import json

from . import layout
from .paths import ROOT

WORKFLOWS = ROOT / "workflows"
#: On the test host, workflows generate 64×64 images in 2 steps from 64-px reference crops.
TEST_IMAGE_SIZE = 64
TEST_CROP_SIZE = 64
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: Workflows that need a newer ComfyUI than the oldest test host (the DiT hooks came in 0.17.0):
#: file name → minimum version. Everything else runs on every host.
MIN_COMFYUI = {
    "flux2_klein_two_people.json": (0, 17, 0),
    "flux1_dev_training_free.json": (0, 17, 0),
}


def runs_on(name: str, version: tuple[int, ...]) -> bool:
    """Whether workflow ``name`` can run on a host of ``version`` (see ``MIN_COMFYUI``)."""
    return version >= MIN_COMFYUI.get(name, (0,))


def needs_text(name: str) -> str:
    return "ComfyUI " + ".".join(map(str, MIN_COMFYUI[name]))
NOTE_TYPES = {"Note", "MarkdownNote"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of every input, required then optional, in the node's own order."""
    order = info.get("input_order", {})
    out = []
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        out += [(name, specs[name]) for name in order.get(group, list(specs))]
    return out


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _extra_widget(spec):
    """The value of the frontend widget that follows this one in widgets_values, if any:
    seeds get "control after generate", image combos an upload button."""
    opts = _opts(spec)
    if opts.get("control_after_generate"):
        return "fixed"
    if opts.get("image_upload"):
        return "image"
    return None


def _default(spec):
    kind, opts = spec[0], _opts(spec)
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else opts.get("options", [])
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


class Out:
    def __init__(self, node: "Node", slot: int):
        self.node, self.slot = node, slot

    @property
    def type(self) -> str:
        return self.node.info["output"][self.slot]


class Node:
    def __init__(self, node_id: int, type_: str, info: dict, title: str | None, stage: str | None,
                 min_size: tuple[float, float] | None):
        self.id, self.type, self.info, self.title = node_id, type_, info, title
        self.stage = stage or layout.stage_of(type_, info.get("category", ""))
        self.min_size = min_size
        self.links_in: dict[str, Out] = {}
        self.widgets: dict[str, object] = {}

    def __getitem__(self, key) -> Out:
        """An output by slot, display name, or type (when exactly one output has that type)."""
        if isinstance(key, int):
            return Out(self, key)
        names, types = list(self.info.get("output_name") or self.info["output"]), list(self.info["output"])
        if key in names:
            return Out(self, names.index(key))
        if types.count(key) == 1:
            return Out(self, types.index(key))
        raise KeyError(f"{self.type} has no output named {key!r} (outputs: {', '.join(names)})")

    @property
    def shows_preview(self) -> bool:
        """Whether the node shows an image on itself after a run (output nodes, nodes with a 'preview')."""
        names = self.info.get("output_name") or []
        return bool(self.info.get("output_node")) or "preview" in names or self.type in PREVIEW_TYPES

    def rows(self) -> int:
        specs = _inputs(self.info)
        widgets = sum(1 + (_extra_widget(spec) is not None) for name, spec in specs
                      if _is_widget(spec) and name not in self.links_in)
        return max(len(self.links_in), len(self.info["output"])) + widgets


#: Pack nodes that preview an image without an output named "preview".
PREVIEW_TYPES = {"IDFusionLandmarkPredictor"}
#: Height kept free in a node for the image it previews after a run (the frontend draws it inside).
PREVIEW_HEIGHT = 280
DEFAULT_WIDTH = 320
NOTE_WIDTH = 720
NOTE_TITLE = "Read me first"


def estimated_size(node: Node) -> tuple[float, float]:
    """A first guess (litegraph's row height); tools/make_workflows.py replaces it by the measured size."""
    return DEFAULT_WIDTH, 40 + 24 * node.rows()


def note_size(text: str) -> tuple[float, float]:
    """Room for a note's text at the frontend's 12-px type: about 105 characters a line of 18 px."""
    lines = sum(1 + len(paragraph) // 105 for paragraph in text.split("\n"))
    return NOTE_WIDTH, 50 + 18 * lines


class Builder:
    """Add nodes with ``add(type, name=value_or_Out, ...)``; ``workflow()`` gives the JSON."""

    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.nodes: list[Node] = []
        self.text = ""

    def add(self, type_: str, title: str | None = None, stage: str | None = None,
            min_size: tuple[float, float] | None = None, **values) -> Node:
        """A node; ``stage`` overrides its layout stage (see layout.py); ``min_size``: (width, height)."""
        if type_ not in self.object_info:
            raise KeyError(f"the host has no node {type_!r}")
        if stage is not None and stage not in layout.STAGES:
            raise KeyError(f"no stage {stage!r}: one of {', '.join(layout.STAGES)}")
        node = Node(len(self.nodes) + 1, type_, self.object_info[type_], title, stage, min_size)
        names = {name for name, _ in _inputs(node.info)}
        for name, value in values.items():
            if name not in names:
                raise KeyError(f"{type_} has no input {name!r}")
            (node.links_in if isinstance(value, Out) else node.widgets)[name] = value
        self.nodes.append(node)
        return node

    def note(self, text: str) -> None:
        """The note at the top of the workflow: what it shows and what to set first."""
        self.text = text

    def sizes(self, measured: dict[int, tuple[float, float]] | None) -> dict[int, tuple[float, float]]:
        """Each node's size: as measured in the frontend (else estimated), at least its minimum size,
        plus room for a preview."""
        out = {}
        for node in self.nodes:
            width, height = (measured or {}).get(node.id) or estimated_size(node)
            floor = node.min_size or (DEFAULT_WIDTH, 0)
            width, height = max(width, floor[0]), max(height, floor[1])
            out[node.id] = (width, height + (PREVIEW_HEIGHT if node.shows_preview else 0))
        return out

    def workflow(self, measured: dict[int, tuple[float, float]] | None = None) -> dict:
        """The frontend-format workflow; ``measured``: node id → (width, height) as the frontend renders it."""
        sizes = self.sizes(measured)
        boxes: dict[int, layout.Box] = {}
        for node in self.nodes:                       # nodes are added after their inputs
            boxes[node.id] = layout.Box(node.id, node.stage, sizes[node.id],
                                        [boxes[o.node.id] for o in node.links_in.values()])
        groups = layout.place(list(boxes.values()))
        links, ui_nodes = [], []
        outgoing: dict[tuple[int, int], list[int]] = {}
        for node in self.nodes:
            inputs = []
            for name, spec in _inputs(node.info):
                if name in node.links_in:
                    out = node.links_in[name]
                    link_id = len(links) + 1
                    links.append([link_id, out.node.id, out.slot, node.id, len(inputs), out.type])
                    outgoing.setdefault((out.node.id, out.slot), []).append(link_id)
                    inputs.append({"name": name, "type": out.type, "link": link_id})
                elif not _is_widget(spec) and name in node.info["input"].get("required", {}):
                    raise ValueError(f"{node.type}: required input {name!r} is not connected")
            widgets = []
            for name, spec in _inputs(node.info):
                if _is_widget(spec) and name not in node.links_in:
                    widgets.append(node.widgets.get(name, _default(spec)))
                    if _extra_widget(spec) is not None:
                        widgets.append(_extra_widget(spec))
            box = boxes[node.id]
            entry = {"id": node.id, "type": node.type, "pos": [box.x, box.y], "size": list(box.size), "flags": {},
                     "order": len(ui_nodes), "mode": 0, "inputs": inputs, "outputs": [],
                     "properties": {"Node name for S&R": node.type}, "widgets_values": widgets}
            if node.title:
                entry["title"] = node.title
            ui_nodes.append(entry)
        names_of = {n.id: (n.info.get("output_name") or n.info["output"]) for n in self.nodes}
        for node, entry in zip(self.nodes, ui_nodes):
            entry["outputs"] = [{"name": names_of[node.id][i], "type": t, "slot_index": i,
                                 "links": outgoing.get((node.id, i), [])} for i, t in enumerate(node.info["output"])]
        rects = [g["bounding"] for g in groups]
        if self.text:
            note = self._note_entry(len(ui_nodes) + 1, layout.bounds(rects))
            ui_nodes.append(note)
            rects.append(layout.node_rect(note["pos"], note["size"]))
        return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": groups, "config": {}, "extra": {"ds": layout.view(rects)}, "version": 0.4}

    def _note_entry(self, node_id: int, graph: list[float]) -> dict:
        """The note, above the graph's top-left corner."""
        width, height = note_size(self.text)
        pos = [graph[0], graph[1] - layout.GROUP_GAP - height]
        return {"id": node_id, "type": "MarkdownNote", "title": NOTE_TITLE, "pos": pos, "size": [width, height],
                "flags": {}, "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [self.text], "color": "#432", "bgcolor": "#653"}


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def names() -> list[str]:
    return sorted(p.name for p in WORKFLOWS.glob("*.json"))


def to_api(workflow: dict, object_info: dict, overrides=None) -> dict:
    """The API-format prompt of a UI workflow. ``overrides(node_type, input_name, value)``
    may replace widget values (model file names, sizes, steps) for a test host."""
    sources = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES or node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        inputs = {}
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for i in node.get("inputs", []):
            if i.get("link") is not None:
                inputs[i["name"]] = list(sources[i["link"]])
        values = iter(node.get("widgets_values", []))
        for name, spec in _inputs(info):
            if not _is_widget(spec) or name in linked:
                continue
            value = next(values)
            if _extra_widget(spec) is not None:
                next(values)
            inputs[name] = overrides(node["type"], name, value) if overrides else value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
