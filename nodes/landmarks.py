"""The landmark predictor node: the source identity's face shape in the driving photo's pose,
drawn as a ControlNet image."""
from __future__ import annotations

import numpy as np
from .api import io, ui

from ..models.faces import landmarks
from ..models.faces.analysis import mean_face
from . import types


class LandmarkPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionLandmarkPredictor",
            display_name="IDFusion Landmark Predictor",
            category="IDFusion/landmarks",
            description="FaceSnap's landmark predictor: keeps the source person's 3D face shape, takes pose and "
                        "expression from the driving photo, and draws the result as a ControlNet image at the "
                        "driving photo's size.",
            inputs=[
                types.Faces.Input("source", tooltip="Faces of the person to keep (several photos are averaged); "
                                                    "needs a pack with the 3D 68-point model (1k3d68.onnx)."),
                types.Faces.Input("driving", tooltip="Faces whose pose and expression to take, one ControlNet image "
                                                     "per driving image (images without a face stay black)."),
                io.Combo.Input("style", options=list(landmarks.STYLES), default="instantid_kps",
                               tooltip="instantid_kps: InstantID's five coloured keypoint sticks; openpose_face: "
                                       "68 white dots as OpenPose/DWPose face ControlNets expect; face_lines: "
                                       "68-point contour lines."),
                io.Float.Input("expression", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="How much of the driving face's expression (eyes, brows, mouth) to take: "
                                       "0 keeps the source's."),
            ],
            outputs=[
                io.Image.Output("control", display_name="control image",
                                tooltip="The predicted landmarks drawn at the driving image's size."),
                types.Landmarks.Output("landmarks", display_name="landmarks",
                                       tooltip="The predicted 2D points per driving image."),
            ],
        )

    @classmethod
    def execute(cls, source, driving, style, expression) -> io.NodeOutput:
        import comfy.utils
        sources = [_points_3d(face, "source") for face in source.all]
        if not sources:
            raise ValueError("IDFusionLandmarkPredictor: the source has no face; check IDFusion Face Detect on the "
                             "source photo (no_face 'skip' may have dropped it)")
        reference = mean_face()
        bar = comfy.utils.ProgressBar(len(driving.per_image))
        points = []
        for image_faces in driving.per_image:
            predicted = [landmarks.predict_landmarks(sources, _points_3d(face, "driving"), reference, expression)[:, :2]
                         for face in image_faces]
            points.append(np.stack(predicted) if predicted else np.zeros((0, 68, 2)))
            bar.update(1)
        result = landmarks.Landmarks(points=tuple(points), sizes=driving.sizes, style=style)
        control = result.render()
        return io.NodeOutput(control, result, ui=ui.PreviewImage(control, cls=cls))


def _points_3d(face, role: str) -> np.ndarray:
    if face.landmark_3d_68 is None:
        raise ValueError(f"IDFusionLandmarkPredictor: the {role} face has no 3D landmarks; load a face analysis "
                         "pack with the 3D 68-point model (1k3d68.onnx, in antelopev2 and buffalo_l)")
    return np.asarray(face.landmark_3d_68, np.float64)


NODES = [LandmarkPredictor]
