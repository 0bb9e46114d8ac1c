"""Where the nodes of an example workflow go: left to right in stages (models and photos → faces →
identity → model → sampling → output), each stage a titled group, every wire running left to
right, a note on top and a saved view that shows the whole graph.

A node's stage comes from ``add(..., stage=)``, else from ``STAGE_OF_TYPE``, else from its
category; a node never stands left of a node it takes an input from (it moves into that
stage). Inside a stage, a node that takes an input from the same stage stands in a further
sub-column; in a sub-column, nodes follow the height of the nodes they take inputs from.
Sizes are the ones the frontend renders (measured in the browser by tools/make_workflows.py),
so nodes never overlap once drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Litegraph's fixed measures: the title bar above ``pos`` and a group's title bar.
NODE_TITLE = 30
GROUP_TITLE = 40
GROUP_FONT = 24
#: Spacing: between nodes in a sub-column, between sub-columns, inside a group, between groups.
NODE_GAP = 30
SUBCOLUMN_GAP = 50
GROUP_PAD = 20
GROUP_GAP = 90
#: The saved view fits the graph into a window of this size with these margins (the frontend's
#: side bar and top bar), so it opens on the whole graph on a 1280 x 800 screen or larger.
VIEW_SIZE = (1180, 640)
VIEW_MARGIN = (80, 100)


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    color: str


STAGES = {stage.key: stage for stage in (
    Stage("models", "Models: set these first", "#3f5159"),
    Stage("photos", "Photos", "#3f593f"),
    Stage("faces", "Faces", "#593f59"),
    Stage("identity", "Identity", "#59503f"),
    Stage("model", "Model with the identity", "#3f4659"),
    Stage("sampling", "Prompt and sampling", "#593f3f"),
    Stage("output", "Output", "#3f5959"),
)}
#: Columns from left to right; stages in one column stand one above the other.
COLUMNS = (("models", "photos"), ("faces",), ("identity",), ("model",), ("sampling",), ("output",))
COLUMN_OF = {key: i for i, column in enumerate(COLUMNS) for key in column}

STAGE_OF_TYPE = {
    **dict.fromkeys(("CheckpointLoaderSimple", "ControlNetLoader", "VAELoader", "CLIPLoader", "DualCLIPLoader",
                     "UNETLoader", "CLIPVisionLoader", "IDFusionReferenceNetLoader", "IDFusionFaceAnalysisLoader",
                     "IDFusionFaceParsingLoader", "IDFusionConsistentIDLoader"), "models"),
    **dict.fromkeys(("LoadImage", "ImageScale"), "photos"),
    **dict.fromkeys(("IDFusionFaceDetect", "IDFusionFaceParse", "IDFusionLandmarkPredictor", "ImageBatch"), "faces"),
    **dict.fromkeys(("IDFusionIdentity", "IDFusionFaceFeatures", "IDFusionCombineIdentities", "IDFusionConsistentIDFace",
                     "IDFusionConsistentIDCombine", "IDFusionDiTFaceFeatures"), "identity"),
    **dict.fromkeys(("IDFusionReferenceAttention", "IDFusionFusedKV", "IDFusionMultiIDMasks",
                     "IDFusionFacePositionMask", "LoraLoader", "LoraLoaderModelOnly", "GrowMask",
                     "IDFusionConsistentIDApply", "IDFusionDiTIdentityReferences", "IDFusionDiTReferenceAttention"),
                    "model"),
    **dict.fromkeys(("CLIPTextEncode", "ControlNetApplyAdvanced", "EmptyLatentImage", "VAEEncode",
                     "SetLatentNoiseMask", "KSampler", "KSamplerAdvanced", "IDFusionReferenceGuider",
                     "KSamplerSelect", "BasicScheduler", "RandomNoise", "SamplerCustomAdvanced", "CFGGuider",
                     "IDFusionConsistentIDConditioning", "ConditioningCombine", "FluxGuidance",
                     "EmptyFlux2LatentImage", "EmptySD3LatentImage"), "sampling"),
    **dict.fromkeys(("VAEDecode", "SaveImage", "PreviewImage", "ImageCompositeMasked"), "output"),
}
#: For node types not in the table: the stage of a category, by its first matching prefix.
STAGE_OF_CATEGORY = (
    ("IDFusion/loaders", "models"), ("IDFusion/faces", "faces"), ("IDFusion/landmarks", "faces"),
    ("IDFusion/identity", "identity"), ("IDFusion/guidance", "sampling"), ("IDFusion/", "model"),
    ("loaders", "models"), ("advanced/loaders", "models"), ("image", "photos"), ("conditioning", "sampling"),
    ("sampling", "sampling"), ("latent", "sampling"),
)


def stage_of(type_: str, category: str) -> str:
    if type_ in STAGE_OF_TYPE:
        return STAGE_OF_TYPE[type_]
    return next((stage for prefix, stage in STAGE_OF_CATEGORY if category.startswith(prefix)), "model")


@dataclass
class Box:
    """A node to place: its size as rendered, its inputs' boxes, and where it ends up."""

    id: int
    stage: str
    size: tuple[float, float]
    inputs: list["Box"]
    x: float = 0.0
    y: float = 0.0
    subcolumn: int = 0

    @property
    def bottom(self) -> float:
        return self.y + self.size[1]


def assign_stages(boxes: list[Box]) -> None:
    """Move a node right into its rightmost input's stage when its own stage stands further left,
    then give each node its sub-column (boxes come after their inputs)."""
    for box in boxes:
        for source in box.inputs:
            if COLUMN_OF[source.stage] > COLUMN_OF[box.stage]:
                box.stage = source.stage
        same = [source.subcolumn for source in box.inputs if source.stage == box.stage]
        box.subcolumn = 1 + max(same) if same else 0


def _target(box: Box) -> float | None:
    """The height a node would like: the mean top of its inputs, loaders aside (they feed everything)."""
    tops = [source.y for source in box.inputs if source.stage != "models"]
    return sum(tops) / len(tops) if tops else None


def place_stage(boxes: list[Box], x: float, top: float) -> tuple[float, float]:
    """Place one stage's nodes from (x, top), first node's title bar included; returns (width, bottom)."""
    width, bottom = 0.0, top
    for sub in sorted({box.subcolumn for box in boxes}):
        column = [box for box in boxes if box.subcolumn == sub]
        column_width = max(box.size[0] for box in column)
        keyed = [(_target(box), i, box) for i, box in enumerate(column)]
        keyed.sort(key=lambda k: (k[0] is not None, k[0] or 0.0, k[1]))
        cursor = top + NODE_TITLE
        for target, _, box in keyed:
            box.x = x + width
            box.y = max(cursor, target if target is not None else cursor)
            cursor = box.bottom + NODE_GAP + NODE_TITLE
            bottom = max(bottom, box.bottom)
        width += column_width + SUBCOLUMN_GAP
    return width - SUBCOLUMN_GAP, bottom


def group(stage: Stage, boxes: list[Box]) -> dict:
    left = min(b.x for b in boxes) - GROUP_PAD
    top = min(b.y for b in boxes) - NODE_TITLE - GROUP_PAD - GROUP_TITLE
    right = max(b.x + b.size[0] for b in boxes) + GROUP_PAD
    bottom = max(b.bottom for b in boxes) + GROUP_PAD
    return {"title": stage.title, "bounding": [left, top, right - left, bottom - top], "color": stage.color,
            "font_size": GROUP_FONT, "flags": {}}


def place(boxes: list[Box], top: float = 0.0) -> list[dict]:
    """Place every box column by column; returns the stage groups in the frontend's format."""
    assign_stages(boxes)
    groups, x = [], 0.0
    for column in COLUMNS:
        column_width, stage_top = 0.0, top
        for key in column:
            members = [box for box in boxes if box.stage == key]
            if not members:
                continue
            width, bottom = place_stage(members, x + GROUP_PAD, stage_top + GROUP_TITLE + GROUP_PAD)
            groups.append(group(STAGES[key], members))
            column_width = max(column_width, width + 2 * GROUP_PAD)
            stage_top = bottom + GROUP_PAD + GROUP_GAP
        if column_width:
            x += column_width + GROUP_GAP
    for i, entry in enumerate(groups, start=1):
        entry["id"] = i
    return groups


def node_rect(pos, size) -> list[float]:
    """[x, y, width, height] of a node drawn at ``pos`` with ``size``, its title bar included."""
    return [pos[0], pos[1] - NODE_TITLE, size[0], size[1] + NODE_TITLE]


def bounds(rects: list[list[float]]) -> list[float]:
    """[left, top, width, height] around [x, y, w, h] rectangles."""
    left, top = min(r[0] for r in rects), min(r[1] for r in rects)
    right, bottom = max(r[0] + r[2] for r in rects), max(r[1] + r[3] for r in rects)
    return [left, top, right - left, bottom - top]


def view(rects: list[list[float]]) -> dict:
    """The frontend's saved view (``extra.ds``) that shows every rectangle: screen = (pos + offset) * scale."""
    left, top, width, height = bounds(rects)
    scale = min(VIEW_SIZE[0] / width, VIEW_SIZE[1] / height, 1.0)
    offset_x = VIEW_MARGIN[0] / scale + (VIEW_SIZE[0] / scale - width) / 2 - left
    offset_y = VIEW_MARGIN[1] / scale - top
    return {"scale": round(scale, 4), "offset": [round(offset_x, 1), round(offset_y, 1)]}
