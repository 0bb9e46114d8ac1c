"""Face nodes: the insightface and face-parsing loaders, face detection with crops and position
masks, and face parsing into region masks."""
from __future__ import annotations

import logging

import numpy as np
import torch
from .api import io, ui

from ..models.faces import analysis as face_models
from ..models.faces import parsing
from . import types

logger = logging.getLogger("IDFusion")


class FaceAnalysisLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionFaceAnalysisLoader",
            display_name="IDFusion Face Analysis Loader",
            category="IDFusion/loaders",
            description="Loads an insightface model pack (detection, landmarks, recognition) from "
                        "models/insightface/models/<pack>/. Never downloads anything.",
            inputs=[
                io.Combo.Input("pack", options=face_models.pack_names(), default="antelopev2",
                               tooltip="Model pack folder under models/insightface/models/ (antelopev2, buffalo_l "
                                       "or any pack in that layout)."),
                io.Combo.Input("provider", options=list(face_models.PROVIDER_CHOICES), default="auto",
                               tooltip="ONNX Runtime execution provider. 'auto' takes the first GPU provider "
                                       "available; anything unavailable falls back to the CPU (the log says which)."),
                io.Int.Input("det_size", default=640, min=160, max=2048, step=32,
                             tooltip="Detector input size in pixels: images are scaled to fit this square. "
                                     "Larger finds smaller faces, slower."),
            ],
            outputs=[types.FaceAnalyzer.Output("analyzer", display_name="face analyzer",
                                               tooltip="The loaded face analysis models.")],
        )

    @classmethod
    def execute(cls, pack, provider, det_size) -> io.NodeOutput:
        return io.NodeOutput(face_models.load_analyzer(pack, provider, det_size))


class FaceDetect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionFaceDetect",
            display_name="IDFusion Face Detect",
            category="IDFusion/faces",
            description="Finds faces in every image of a batch: boxes, landmarks and embeddings, FlashFace-style "
                        "crops (eyes levelled), ArcFace-aligned crops and FlashFace position masks.",
            inputs=[
                types.FaceAnalyzer.Input("analyzer", tooltip="From IDFusion Face Analysis Loader."),
                io.Image.Input("image", tooltip="An image batch; every image is searched."),
                io.Combo.Input("selection", options=list(face_models.SELECTIONS), default="largest",
                               tooltip="Per image: the largest face, all faces left to right, the face at 'index' "
                                       "counted from the left, or all faces best score first."),
                io.Int.Input("index", default=0, min=0, max=64,
                             tooltip="Which face, counted from the left from 0, when selection is by_index."),
                io.Float.Input("min_score", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Detections scoring below this are ignored."),
                io.Combo.Input("no_face", options=["error", "skip"], default="error",
                               tooltip="An image without a (selected) face: stop with an error naming it, or skip "
                                       "it (no crops, an empty position mask)."),
                io.Int.Input("crop_size", default=224, min=64, max=1024, step=8,
                             tooltip="Side of the square FlashFace-style crops (FlashFace uses 224)."),
                io.Float.Input("margin", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Grow the face box by this fraction of its size on each side before "
                                       "cropping (0 = FlashFace's raw box)."),
            ],
            outputs=[
                types.Faces.Output("faces", display_name="faces", tooltip="Detections per image, with their crops."),
                io.Image.Output("crops", display_name="crops",
                                tooltip="FlashFace-style crops of all selected faces, image by image."),
                io.Image.Output("aligned", display_name="aligned crops",
                                tooltip="ArcFace 112x112 aligned crops, same order."),
                io.Mask.Output("position_mask", display_name="position mask",
                               tooltip="Per image: FlashFace's face position squares."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="The images with boxes, squares and keypoints drawn."),
            ],
        )

    @classmethod
    def execute(cls, analyzer, image, selection, index, min_score, no_face, crop_size, margin) -> io.NodeOutput:
        import comfy.utils
        if image.ndim == 3:
            image = image[..., None]
        bar = comfy.utils.ProgressBar(image.shape[0])
        per_image, previews = [], []
        for i in range(image.shape[0]):
            rgb = face_models.to_rgb_uint8(image[i], f"IDFusionFaceDetect: image {i} of the batch")
            found = analyzer.detect(rgb, min_score, image_index=i)
            chosen = face_models.select_faces(found, selection, index)
            if not chosen:
                _no_face(i, found, selection, index, min_score, no_face)
            per_image.append(tuple(chosen))
            previews.append(face_models.draw_faces(rgb, chosen))
            bar.update(1)
        faces = _with_crops(per_image, image, crop_size, margin)
        preview = torch.from_numpy(np.stack(previews)).float() / 255.0
        masks = face_models.position_masks(faces)
        return io.NodeOutput(faces, faces.crops, faces.aligned, masks, preview, ui=ui.PreviewImage(preview, cls=cls))


def _no_face(i: int, found: list, selection: str, index: int, min_score: float, policy: str) -> None:
    if selection == "by_index" and found:
        problem = f"has {len(found)} face(s) with score >= {min_score}, so there is no face at index {index}"
        fix = "lower index"
    else:
        problem = f"has no face with score >= {min_score}"
        fix = "lower min_score or use a clearer photo"
    if policy == "error":
        raise ValueError(f"IDFusionFaceDetect: image {i} of the batch {problem}; {fix}, or set no_face to 'skip'")
    logger.warning("IDFusionFaceDetect: image %d of the batch %s; skipped", i, problem)


def _with_crops(per_image: list[tuple], image: torch.Tensor, crop_size: int, margin: float) -> face_models.Faces:
    crops, aligned = [], []
    for i, chosen in enumerate(per_image):
        pixels = image[i, ..., :3].expand(-1, -1, 3).float().cpu().numpy() if chosen else None
        for face in chosen:
            crops.append(face_models.flashface_crop(pixels, face.bbox, face.kps, crop_size, margin))
            aligned.append(face_models.arcface_crop(pixels, face.kps))
    return face_models.Faces(
        per_image=tuple(per_image),
        sizes=tuple((int(image.shape[1]), int(image.shape[2])) for _ in per_image),
        crops=_stack(crops, crop_size),
        aligned=_stack(aligned, 112),
    )


def _stack(images: list[np.ndarray], size: int) -> torch.Tensor:
    if not images:
        return torch.zeros(0, size, size, 3)
    return torch.from_numpy(np.stack(images)).float().clamp(0, 1)


class FaceParsingLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionFaceParsingLoader",
            display_name="IDFusion Face Parsing Loader",
            category="IDFusion/loaders",
            description="Loads facexlib's BiSeNet face parser (19 labels) from models/facexlib/.",
            inputs=[
                io.Combo.Input("model", options=parsing.model_names(), default=parsing.DEFAULT_MODEL,
                               tooltip="BiSeNet weights in models/facexlib/ (facexlib's parsing_bisenet.pth)."),
            ],
            outputs=[types.FaceParser.Output("parser", display_name="face parser", tooltip="The loaded face parser.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(parsing.load_parser(model))


class FaceParse(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        region_outputs = [io.Mask.Output(name, display_name=f"{name} mask",
                                         tooltip=f"Pixels labelled {', '.join(parsing.LABELS[i] for i in ids)}.")
                          for name, ids in parsing.REGIONS.items()]
        return io.Schema(
            node_id="IDFusionFaceParse",
            display_name="IDFusion Face Parse",
            category="IDFusion/faces",
            description="Labels every pixel of face images (BiSeNet, CelebAMask-HQ's 19 labels) and outputs "
                        "region masks and a colour preview. Works best on face crops.",
            inputs=[
                types.FaceParser.Input("parser", tooltip="From IDFusion Face Parsing Loader."),
                io.Image.Input("image", tooltip="Face images, e.g. the crops of IDFusion Face Detect."),
                io.String.Input("labels", default="", optional=True,
                                tooltip="Labels for the 'selected' mask, by name or number, comma separated: "
                                        + ", ".join(f"{i} {n}" for i, n in enumerate(parsing.LABELS))),
            ],
            outputs=[*region_outputs,
                     io.Mask.Output("selected", display_name="selected labels mask",
                                    tooltip="Pixels with one of the labels you listed."),
                     io.Image.Output("preview", display_name="preview",
                                     tooltip="The labels in colour over the image.")],
        )

    @classmethod
    def execute(cls, parser, image, labels="") -> io.NodeOutput:
        import comfy.utils
        try:
            selected_ids = parsing.parse_label_list(labels)
        except ValueError as error:
            raise ValueError(f"IDFusionFaceParse: labels: {error}") from None
        if image.ndim == 3:
            image = image[..., None]
        bar = comfy.utils.ProgressBar(image.shape[0])
        maps = []
        for i in range(image.shape[0]):
            maps.append(parser.parse(image[i, ..., :3].expand(-1, -1, 3)))
            bar.update(1)
        label_maps = torch.stack(maps)
        regions = [parsing.region_masks(label_maps, ids) for ids in parsing.REGIONS.values()]
        preview = 0.5 * image[..., :3].expand(-1, -1, -1, 3).float().cpu() + 0.5 * parsing.colorize(label_maps)
        return io.NodeOutput(*regions, parsing.region_masks(label_maps, selected_ids), preview,
                             ui=ui.PreviewImage(preview, cls=cls))


NODES = [FaceAnalysisLoader, FaceDetect, FaceParsingLoader, FaceParse]
