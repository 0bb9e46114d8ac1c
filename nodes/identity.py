"""The identity node: face crops (and their embeddings) of one person become one identity."""
from __future__ import annotations

from .api import io

from ..models.faces.analysis import pad_to_square
from ..models.faces.identity import Identity
from . import types


class IdentityNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionIdentity",
            display_name="IDFusion Identity",
            category="IDFusion/identity",
            description="Turns the face crops of one person (one or several photos) into an identity for the "
                        "reference and fusion nodes. Photos of different sizes: detect each, then batch the crops "
                        "(they share crop_size) with Batch Images.",
            inputs=[
                types.Faces.Input("faces", optional=True,
                                  tooltip="From IDFusion Face Detect: its crops, ArcFace crops and embeddings are "
                                          "used (every selected face is one reference photo)."),
                io.Image.Input("crops", optional=True,
                               tooltip="Face crops of this person, one per photo. Without 'faces' any face images "
                                       "work; with 'faces' there must be one crop per face."),
                io.String.Input("label", default="identity", tooltip="A name shown in logs and previews."),
                io.Int.Input("size", default=224, min=64, max=1024, step=8,
                             tooltip="Crops are padded to a square and resized to this side (FlashFace: 224)."),
            ],
            outputs=[
                types.Identity.Output("identity", display_name="identity",
                                      tooltip="The person: reference crops, embeddings, a label."),
                io.Image.Output("reference_crops", display_name="crops",
                                tooltip="The reference crops exactly as the identity holds them."),
            ],
        )

    @classmethod
    def execute(cls, label, size, faces=None, crops=None) -> io.NodeOutput:
        images = _crops(faces, crops)
        whole = faces is not None and faces.count == images.shape[0]
        identity = Identity(
            crops=pad_to_square(images, size),
            label=label,
            embeddings=faces.embeddings() if whole else None,
            aligned=faces.aligned if whole and faces.aligned.shape[0] else None,
        )
        return io.NodeOutput(identity, identity.crops)


def _crops(faces, crops):
    """The crop batch [N, H, W, C] to use, with the user's mistakes named."""
    if faces is None and crops is None:
        raise ValueError("IDFusionIdentity: nothing to build the identity from; connect 'faces' (from IDFusion "
                         "Face Detect) or 'crops' (face images)")
    if crops is not None and crops.ndim == 3:
        crops = crops[..., None]
    if crops is not None and faces is not None and crops.shape[0] != faces.count:
        raise ValueError(f"IDFusionIdentity: {crops.shape[0]} crops but {faces.count} faces; connect the crops and "
                         "faces of the same IDFusion Face Detect node, or leave 'faces' unconnected")
    images = crops if crops is not None else faces.crops
    if images.shape[0] == 0:
        raise ValueError("IDFusionIdentity: there is no face to build the identity from (IDFusion Face Detect "
                         "skipped every image); use photos where a face is found, or lower its min_score")
    return images


NODES = [IdentityNode]
