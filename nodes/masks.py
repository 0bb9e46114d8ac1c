"""Multi-identity mask builder: one region per identity, with a colour preview."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from . import types

SOURCE_MASKS = "masks (one per identity)"
SOURCE_FACES = "face boxes (left to right)"
SOURCE_COLUMNS = "columns (left to right)"
NODE = "IDFusionMultiIDMasks"


def masks_from_input(masks, count: int, height: int, width: int) -> torch.Tensor:
    from ..attention.routing import fit_to_latent

    if masks is None:
        raise ValueError(f"{NODE}: source is '{SOURCE_MASKS}' but 'masks' is not connected; connect a MASK batch "
                         f"with one mask per identity")
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.shape[0] != count:
        raise ValueError(f"{NODE}: 'masks' holds {masks.shape[0]} mask(s) but 'count' is {count}; give one mask per "
                         f"identity (batch them with a 'Batch Masks' node) or set count to {masks.shape[0]}")
    return fit_to_latent(masks.float().cpu(), height, width, what="'masks'").clamp(0, 1)


def masks_from_faces(faces, image_index: int, count: int, height: int, width: int, margin: float) -> torch.Tensor:
    from ..models.masks import box_mask

    if faces is None:
        raise ValueError(f"{NODE}: source is '{SOURCE_FACES}' but 'faces' is not connected; connect "
                         f"'IDFusion Face Detect'")
    found = sorted(faces.for_image(image_index), key=lambda f: (f.bbox[0] + f.bbox[2]) / 2)
    if len(found) < count:
        raise ValueError(f"{NODE}: image {image_index} of 'faces' has {len(found)} face(s) but 'count' is {count}; "
                         f"lower count or use a photo with {count} faces")
    src_h, src_w = faces.image_size(image_index)
    scale = (width / src_w, height / src_h)
    return torch.stack([box_mask(f.bbox, height, width, margin, scale) for f in found[:count]])


class MultiIDMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..models.masks import EARLIER, OVERLAP_RULES
        return io.Schema(
            node_id=NODE,
            display_name="IDFusion Multi-ID Masks",
            category="IDFusion/masks",
            description="One region per identity (identity 1 = the first region) for several people in one picture: "
                        "from MASK inputs, from detected face boxes grown by a margin, or as N columns. Each person's "
                        "region attends only to its own identity in the IDFusion patches.",
            inputs=[
                io.Int.Input("width", default=512, min=64, max=8192, step=8, tooltip="Width of the image being generated."),
                io.Int.Input("height", default=512, min=64, max=8192, step=8, tooltip="Height of the image being generated."),
                io.Int.Input("count", default=2, min=1, max=8, tooltip="Number of identities (regions)."),
                io.Combo.Input("source", options=[SOURCE_COLUMNS, SOURCE_MASKS, SOURCE_FACES], default=SOURCE_COLUMNS,
                               tooltip="Where the regions come from."),
                io.Combo.Input("overlap", options=list(OVERLAP_RULES), default=EARLIER,
                               tooltip="Who keeps pixels claimed by several regions."),
                io.Float.Input("margin", default=0.5, min=0.0, max=4.0, step=0.05,
                               tooltip="Face boxes: grow each box by this fraction of its size on every side."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Source 'masks': a MASK batch, one per identity, at the image size (or its aspect ratio)."),
                types.Faces.Input("faces", optional=True, tooltip="Source 'face boxes': faces from 'IDFusion Face Detect'."),
                io.Int.Input("image_index", default=0, min=0, max=4095, optional=True,
                             tooltip="Source 'face boxes': which image of the detection batch to take the boxes from."),
            ],
            outputs=[
                types.IdentityMasks.Output(display_name="IDENTITY_MASKS", tooltip="For the IDFusion patches (by region)."),
                io.Mask.Output(display_name="MASKS", tooltip="The resolved regions as a MASK batch."),
                io.Image.Output(display_name="PREVIEW", tooltip="Each region in its identity's colour."),
            ],
        )

    @classmethod
    def execute(cls, width, height, count, source, overlap, margin, masks=None, faces=None, image_index=0) -> io.NodeOutput:
        from ..models.masks import IdentityMasks, check_regions, column_masks, preview, resolve_overlaps

        if source == SOURCE_MASKS:
            raw = masks_from_input(masks, count, height, width)
        elif source == SOURCE_FACES:
            raw = masks_from_faces(faces, image_index, count, height, width, margin)
        else:
            raw = column_masks(count, height, width)
        resolved = resolve_overlaps(raw, overlap)
        check_regions(resolved, NODE)
        image = preview(resolved)
        labels = tuple(f"identity {i + 1}" for i in range(count))
        return io.NodeOutput(IdentityMasks(resolved, labels), resolved, image, ui=ui.PreviewImage(image, cls=cls))


NODES = [MultiIDMasks]
