#!/usr/bin/env python3
"""Regenerate the example workflows in workflows/ from the real host's /object_info.

    .host/venv/bin/python tools/make_workflows.py

Starts the test host (tests/idf_testlib/server.py), lays every graph out with the node
definitions the host reports (so widget order and sockets always match the code), and writes
``workflows/<name>.json`` in the frontend's format. Each workflow is run end to end by
tests/e2e/test_workflows.py and opened in the browser by tests/browser/test_frontend.py.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from idf_testlib.server import ComfyServer  # noqa: E402
from idf_testlib.workflows import WORKFLOWS, Builder  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
FLASHFACE = "flashface.ckpt"
CONTROLNET = "control_v11p_sd15_openpose.pth"
NEGATIVE = "blurry, lowres, bad anatomy, deformed face, watermark, text"


class Graph(Builder):
    """Builder with the pieces every IDFusion example shares."""

    def base(self, prompt: str):
        self.ckpt = self.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
        self.positive = self.add("CLIPTextEncode", title="Prompt", text=prompt, clip=self.ckpt["CLIP"])
        self.negative = self.add("CLIPTextEncode", title="Negative prompt", text=NEGATIVE, clip=self.ckpt["CLIP"])
        self.analyzer = self.add("IDFusionFaceAnalysisLoader", pack="antelopev2", provider="auto", det_size=640)

    def identity(self, photos: list[str], label: str, min_score: float = 0.5):
        """Photos of one person → face crops (one per photo) → an identity (FlashFace: min_score 0.6,
        the official detection threshold)."""
        crops = None
        for photo in photos:
            image = self.add("LoadImage", title=f"{label}: {photo}", image=photo)
            faces = self.add("IDFusionFaceDetect", analyzer=self.analyzer[0], image=image["IMAGE"],
                             selection="largest", min_score=min_score, crop_size=224)
            crops = faces[1] if crops is None else self.add("ImageBatch", image1=crops, image2=faces[1])["IMAGE"]
        return self.add("IDFusionIdentity", title=label, crops=crops, label=label, size=224)[0]

    def features(self, refnet, identity, flashface: bool = False):
        """Face Features; with FlashFace weights the reference pass runs with the negative prompt
        (the official reference context), training-free with the empty prompt (CLIP)."""
        context = {"negative": self.negative[0]} if flashface else {"clip": self.ckpt["CLIP"]}
        return self.add("IDFusionFaceFeatures", reference_net=refnet["REFERENCE_NET"], vae=self.ckpt["VAE"],
                        identity=identity, size=224, disk_cache=False, **context)["FEATURES"]

    def ksampler(self, model, width: int, height: int, prefix: str, steps: int = 25, cfg: float = 7.0):
        latent = self.add("EmptyLatentImage", width=width, height=height, batch_size=1)
        out = self.add("KSampler", model=model, positive=self.positive[0], negative=self.negative[0],
                       latent_image=latent["LATENT"], seed=42, steps=steps, cfg=cfg, sampler_name="dpmpp_2m",
                       scheduler="karras", denoise=1.0)
        self.save(out["LATENT"], prefix)

    def guided(self, model, width: int, height: int, prefix: str, steps: int = 25):
        """FlashFace's sampling: three-way reference guidance, DDIM with the 'simple' scheduler (the
        official 'trailing' timesteps 999, 959, …, 39 for 25 steps)."""
        guider = self.add("IDFusionReferenceGuider", model=model, positive=self.positive[0], negative=self.negative[0],
                          text_scale=7.5, reference_scale=2.0, lambda_before=0.85, launch_timestep=750, rescale=0.5)
        latent = self.add("EmptyLatentImage", width=width, height=height, batch_size=1)
        sampler = self.add("KSamplerSelect", sampler_name="ddim")
        sigmas = self.add("BasicScheduler", model=model, scheduler="simple", steps=steps, denoise=1.0)
        noise = self.add("RandomNoise", noise_seed=42)
        out = self.add("SamplerCustomAdvanced", noise=noise["NOISE"], guider=guider["GUIDER"],
                       sampler=sampler["SAMPLER"], sigmas=sigmas["SIGMAS"], latent_image=latent["LATENT"])
        self.save(out["output"], prefix)

    def save(self, latent, prefix: str):
        image = self.add("VAEDecode", samples=latent, vae=self.ckpt["VAE"])
        self.add("SaveImage", images=image["IMAGE"], filename_prefix=f"IDFusion/{prefix}")


def flashface_four_references(info) -> dict:
    g = Graph(info)
    g.note("FlashFace personalization with four reference photos of one person.\n"
           f"Models: models/checkpoints/{CHECKPOINT} (any SD1.5), models/flashface/{FLASHFACE}, "
           "models/insightface/models/antelopev2/.\nPut four photos of the person in ComfyUI's input folder and "
           "pick them in the Load Image nodes. The Face Position Mask says where the face goes "
           "(all zero = anywhere). Strength 0.75–1 and reference scale 2–2.5 balance likeness and prompt.")
    g.base("a photo of a man wearing a suit, standing in a park, autumn, soft light")
    refnet = g.add("IDFusionReferenceNetLoader", model=g.ckpt["MODEL"], weights=FLASHFACE)
    identity = g.identity([f"idfusion_person_a_{i}.png" for i in range(1, 5)], "person A", min_score=0.6)
    features = g.features(refnet, identity, flashface=True)
    position = g.add("IDFusionFacePositionMask", width=768, height=768, x1=0.3, y1=0.1, x2=0.6, y2=0.4)
    model = g.add("IDFusionReferenceAttention", model=refnet["MODEL"], features=features, strength=0.85,
                  blocks="auto (FlashFace: decoder)", position_mask=position["MASK"])
    g.guided(model["MODEL"], 768, 768, "flashface")
    return g.workflow()


def training_free_sd15(info) -> dict:
    g = Graph(info)
    g.note("Training-free personalization on any SD1.5 checkpoint: the checkpoint's own UNet encodes the "
           "reference faces (no extra weights). Works with LoRAs and ControlNets; plain KSampler.")
    g.base("portrait photo of a woman as an astronaut, detailed, studio light")
    refnet = g.add("IDFusionReferenceNetLoader", model=g.ckpt["MODEL"], weights="training-free (this MODEL's own UNet)")
    identity = g.identity(["idfusion_person_b_1.png", "idfusion_person_b_2.png"], "person B")
    features = g.features(refnet, identity)
    model = g.add("IDFusionReferenceAttention", model=refnet["MODEL"], features=features, strength=0.6,
                  blocks="auto (FlashFace: decoder)")
    g.ksampler(model["MODEL"], 512, 512, "training_free")
    return g.workflow()


def identity_mixing(info) -> dict:
    g = Graph(info)
    g.note("Identity mixing (FlashFace supplement): two people blended by weight. Move the weights of "
           "'IDFusion Combine Identities' to slide from one person to the other.")
    g.base("a photo of a person smiling, close-up portrait, natural light")
    refnet = g.add("IDFusionReferenceNetLoader", model=g.ckpt["MODEL"], weights=FLASHFACE)
    a = g.features(refnet, g.identity(["idfusion_person_a_1.png", "idfusion_person_a_2.png"], "person A", 0.6), True)
    b = g.features(refnet, g.identity(["idfusion_person_b_1.png", "idfusion_person_b_2.png"], "person B", 0.6), True)
    mixed = g.add("IDFusionCombineIdentities", features_1=a, weight_1=0.5, features_2=b, weight_2=0.5)
    model = g.add("IDFusionReferenceAttention", model=refnet["MODEL"], features=mixed["FEATURES"], strength=0.85,
                  identity_mode="mix (weights)")
    g.guided(model["MODEL"], 768, 768, "identity_mixing")
    return g.workflow()


def fused_kv_three_references(info) -> dict:
    g = Graph(info)
    g.note("Fused keys/values (face fusion): three reference photos join the text in every cross-attention "
           "under one softmax. Training-free projections by default; trained adapters go in models/idfusion.")
    g.base("a photo of a man reading a book in a cafe, cinematic")
    refnet = g.add("IDFusionReferenceNetLoader", model=g.ckpt["MODEL"], weights="training-free (this MODEL's own UNet)")
    identity = g.identity([f"idfusion_person_a_{i}.png" for i in range(1, 4)], "person A")
    features = g.features(refnet, identity)
    model = g.add("IDFusionFusedKV", model=refnet["MODEL"], features=features, weight=1.0,
                  blocks="all (input + middle + output)", adapter="training-free (self-attention projections)")
    g.ksampler(model["MODEL"], 512, 512, "fused_kv")
    return g.workflow()


def two_person_masks(info) -> dict:
    g = Graph(info)
    g.note("Two people in one picture, kept apart: person A on the left, person B on the right. Each region "
           "attends only to its own identity, in the fused keys/values and in reference attention.")
    g.base("photo of two friends standing side by side on a beach, sunset")
    refnet = g.add("IDFusionReferenceNetLoader", model=g.ckpt["MODEL"], weights="training-free (this MODEL's own UNet)")
    a = g.features(refnet, g.identity(["idfusion_person_a_1.png", "idfusion_person_a_2.png"], "person A"))
    b = g.features(refnet, g.identity(["idfusion_person_b_1.png", "idfusion_person_b_2.png"], "person B"))
    both = g.add("IDFusionCombineIdentities", features_1=a, weight_1=1.0, features_2=b, weight_2=1.0)
    masks = g.add("IDFusionMultiIDMasks", width=768, height=512, count=2, source="columns (left to right)",
                  overlap="earlier identity wins")
    fused = g.add("IDFusionFusedKV", model=refnet["MODEL"], features=both["FEATURES"], weight=1.0,
                  identity_mode="by region (identity masks)", outside="none", identity_masks=masks["IDENTITY_MASKS"])
    model = g.add("IDFusionReferenceAttention", model=fused["MODEL"], features=both["FEATURES"], strength=0.6,
                  identity_mode="by region (identity masks)", outside="none", identity_masks=masks["IDENTITY_MASKS"])
    g.ksampler(model["MODEL"], 768, 512, "two_people")
    return g.workflow()


def pose_driven_personalization(info) -> dict:
    g = Graph(info)
    g.note("Pose-driven personalization (FaceSnap's landmark predictor): person A's face, in the pose and "
           "expression of a driving photo. IDFusion Landmark Predictor keeps person A's 3D face shape, takes "
           "head pose and expression from the driving face and draws the 68 landmarks as OpenPose face "
           "keypoints for an SD1.5 OpenPose ControlNet; the reference path (IDFusion Face Features + "
           "Reference Attention, restricted to the driving face's position) keeps the likeness.\n"
           f"Models: models/checkpoints/{CHECKPOINT} (any SD1.5), models/controlnet/{CONTROLNET}, "
           "models/insightface/models/antelopev2/. With FlashFace weights, pick flashface.ckpt in the "
           "ReferenceNet loader.")
    g.base("a photo of a woman laughing, city street at night, bokeh, detailed skin")
    refnet = g.add("IDFusionReferenceNetLoader", model=g.ckpt["MODEL"],
                   weights="training-free (this MODEL's own UNet)")
    source_photo = g.add("LoadImage", title="person A", image="idfusion_person_a_1.png")
    source = g.add("IDFusionFaceDetect", title="person A: face", analyzer=g.analyzer[0], image=source_photo["IMAGE"],
                   selection="largest", crop_size=224)
    identity = g.add("IDFusionIdentity", title="person A", faces=source[0], label="person A", size=224)
    features = g.features(refnet, identity[0])
    driving_photo = g.add("LoadImage", title="driving pose", image="idfusion_driving_pose.png")
    driving_image = g.add("ImageScale", image=driving_photo["IMAGE"], upscale_method="lanczos", width=512,
                          height=512, crop="center")
    driving = g.add("IDFusionFaceDetect", title="driving: face", analyzer=g.analyzer[0], image=driving_image["IMAGE"],
                    selection="largest", crop_size=224)
    landmarks = g.add("IDFusionLandmarkPredictor", source=source[0], driving=driving[0], style="openpose_face",
                      expression=1.0)
    controlnet = g.add("ControlNetLoader", control_net_name=CONTROLNET)
    conditioned = g.add("ControlNetApplyAdvanced", positive=g.positive[0], negative=g.negative[0],
                        control_net=controlnet[0], image=landmarks[0], strength=0.8, start_percent=0.0,
                        end_percent=0.8, vae=g.ckpt["VAE"])
    model = g.add("IDFusionReferenceAttention", model=refnet["MODEL"], features=features, strength=0.6,
                  blocks="auto (FlashFace: decoder)", position_mask=driving[3])
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    out = g.add("KSampler", model=model["MODEL"], positive=conditioned[0], negative=conditioned[1],
                latent_image=latent["LATENT"], seed=42, steps=25, cfg=7.0, sampler_name="dpmpp_2m",
                scheduler="karras", denoise=1.0)
    g.save(out["LATENT"], "pose_driven")
    return g.workflow()


GRAPHS = [flashface_four_references, training_free_sd15, identity_mixing, fused_kv_three_references, two_person_masks,
          pose_driven_personalization]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(Path(tmp), name="make-workflows").start()
        try:
            info = server.object_info()
        finally:
            server.stop()
    WORKFLOWS.mkdir(exist_ok=True)
    for graph in GRAPHS:
        path = WORKFLOWS / f"{graph.__name__}.json"
        path.write_text(json.dumps(graph(info), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
