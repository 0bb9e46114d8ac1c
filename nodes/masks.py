"""Multi-identity mask builder: one region per identity, with a colour preview."""
from __future__ import annotations

import torch
from .api import io, ui

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
    return fit_to_latent(masks.float().cpu(), height, width, what=f"{NODE}: 'masks'", pixels_per_unit=1).clamp(0, 1)


def masks_from_faces(faces, image_index: int, count: int, height: int, width: int, margin: float) -> torch.Tensor:
    from ..models.masks import box_mask

    if faces is None:
        raise ValueError(f"{NODE}: source is '{SOURCE_FACES}' but 'faces' is not connected; connect "
                         f"'IDFusion Face Detect'")
    if not 0 <= image_index < len(faces.sizes):
        raise ValueError(f"{NODE}: image_index {image_index} but 'faces' covers {len(faces.sizes)} image(s)")
    found = sorted(faces.for_image(image_index), key=lambda f: (f.bbox[0] + f.bbox[2]) / 2)
    if len(found) < count:
        raise ValueError(f"{NODE}: image {image_index} of 'faces' has {len(found)} face(s) but 'count' is {count}; "
                         f"lower count or use a photo with {count} faces")
    src_h, src_w = faces.sizes[image_index]
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
                types.IdentityMasks.Output(display_name="identity masks",
                                           tooltip="For the IDFusion patches (by region)."),
                io.Mask.Output(display_name="region masks", tooltip="The resolved regions as a MASK batch."),
                io.Image.Output(display_name="preview", tooltip="Each region in its identity's colour."),
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


class FacePositionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionFacePositionMask",
            display_name="IDFusion Face Position Mask",
            category="IDFusion/masks",
            description="Where the face goes in the generated image, FlashFace style: the box (fractions of the "
                        "image, like the official demo's [x1, y1, x2, y2]) becomes a square of side max(w, h) "
                        "anchored at its top-left corner. For 'IDFusion Reference Attention' position_mask.",
            inputs=[
                io.Int.Input("width", default=768, min=64, max=8192, step=8, tooltip="Width of the image being generated."),
                io.Int.Input("height", default=768, min=64, max=8192, step=8, tooltip="Height of the image being generated."),
                io.Float.Input("x1", default=0.3, min=0.0, max=1.0, step=0.01, tooltip="Left edge, as a fraction of the width."),
                io.Float.Input("y1", default=0.1, min=0.0, max=1.0, step=0.01, tooltip="Top edge, as a fraction of the height."),
                io.Float.Input("x2", default=0.6, min=0.0, max=1.0, step=0.01, tooltip="Right edge, as a fraction of the width."),
                io.Float.Input("y2", default=0.4, min=0.0, max=1.0, step=0.01, tooltip="Bottom edge, as a fraction of the height."),
            ],
            outputs=[
                io.Mask.Output(display_name="position mask", tooltip="1 inside the face square, 0 elsewhere."),
                io.Image.Output(display_name="preview", tooltip="The mask as an image."),
            ],
        )

    @classmethod
    def execute(cls, width, height, x1, y1, x2, y2) -> io.NodeOutput:
        from ..models.faces.analysis import position_mask_from_box

        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"IDFusionFacePositionMask: the box [{x1}, {y1}, {x2}, {y2}] is empty; x2 must exceed x1 "
                             f"and y2 must exceed y1")
        mask = position_mask_from_box((x1 * width, y1 * height, x2 * width, y2 * height), height, width)
        image = mask[None, :, :, None].expand(-1, -1, -1, 3)
        return io.NodeOutput(mask[None], image, ui=ui.PreviewImage(image, cls=cls))


NODES = [MultiIDMasks, FacePositionMask]
