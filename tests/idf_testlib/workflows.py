"""Example workflows in the frontend's format: a builder that lays graphs out from the host's
``/object_info``, and a converter to the API format ``/prompt`` takes (as the frontend does
when you press Queue)."""
from __future__ import annotations

import json

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
    def __init__(self, node_id: int, type_: str, info: dict, title: str | None):
        self.id, self.type, self.info, self.title = node_id, type_, info, title
        self.links_in: dict[str, Out] = {}
        self.widgets: dict[str, object] = {}

    def __getitem__(self, key) -> Out:
        names = self.info.get("output_name") or self.info["output"]
        slot = key if isinstance(key, int) else list(names).index(key)
        return Out(self, slot)


class Builder:
    """Add nodes with ``add(type, name=value_or_Out, ...)``; ``workflow()`` gives the JSON."""

    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.nodes: list[Node] = []
        self.notes: list[tuple[str, tuple[int, int]]] = []

    def add(self, type_: str, title: str | None = None, **values) -> Node:
        if type_ not in self.object_info:
            raise KeyError(f"the host has no node {type_!r}")
        node = Node(len(self.nodes) + 1, type_, self.object_info[type_], title)
        names = {name for name, _ in _inputs(node.info)}
        for name, value in values.items():
            if name not in names:
                raise KeyError(f"{type_} has no input {name!r}")
            (node.links_in if isinstance(value, Out) else node.widgets)[name] = value
        self.nodes.append(node)
        return node

    def note(self, text: str) -> None:
        self.notes.append(text)

    def _depths(self) -> dict[int, int]:
        depth = {}
        for node in self.nodes:                       # nodes are added after their inputs
            depth[node.id] = 1 + max((depth[o.node.id] for o in node.links_in.values()), default=-1)
        return depth

    def workflow(self) -> dict:
        depth = self._depths()
        column_y: dict[int, float] = {}
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
            n_rows = len(inputs) + len(widgets) + len(node.info["output"])
            height = 46 + 24 * n_rows
            x = 40 + 380 * depth[node.id]
            y = column_y.get(depth[node.id], 40)
            column_y[depth[node.id]] = y + height + 40
            entry = {"id": node.id, "type": node.type, "pos": [x, y], "size": [340, height], "flags": {},
                     "order": len(ui_nodes), "mode": 0, "inputs": inputs, "outputs": [],
                     "properties": {"Node name for S&R": node.type}, "widgets_values": widgets}
            if node.title:
                entry["title"] = node.title
            ui_nodes.append(entry)
        names_of = {n.id: (n.info.get("output_name") or n.info["output"]) for n in self.nodes}
        for node, entry in zip(self.nodes, ui_nodes):
            entry["outputs"] = [{"name": names_of[node.id][i], "type": t, "slot_index": i,
                                 "links": outgoing.get((node.id, i), [])} for i, t in enumerate(node.info["output"])]
        next_id = len(ui_nodes) + 1
        for i, text in enumerate(self.notes):
            ui_nodes.append({"id": next_id + i, "type": "Note", "pos": [40, -220 - 200 * i], "size": [720, 180],
                             "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                             "properties": {}, "widgets_values": [text]})
        return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}}, "version": 0.4}


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
