#!/usr/bin/env python3
"""Regenerate the example workflows in workflows/ from the real host's /object_info.

    .host/0.3.75/venv/bin/python tools/make_workflows.py [graph ...]
    IDFUSION_HOST_NAME=0.33.0 .host/0.33.0/venv/bin/python tools/make_workflows.py flux2_klein_two_people ...

Starts the test host (tests/idf_testlib/server.py), lays every graph out with the node
definitions the host reports (so widget order and sockets always match the code), and writes
``workflows/<name>.json`` in the frontend's format; graphs that need a newer ComfyUI
(``idf_testlib.workflows.MIN_COMFYUI``: the DiT ones) are made only on a host that has it.
Each workflow is run end to end by tests/e2e/test_workflows.py and opened in the browser by
tests/browser/test_frontend.py.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from idf_testlib.paths import comfy_version  # noqa: E402
from idf_testlib.server import ComfyServer  # noqa: E402
from idf_testlib.workflows import WORKFLOWS, Builder, needs_text, runs_on  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
FLUX2_KLEIN = "flux-2-klein-4b.safetensors"
QWEN3_4B = "qwen_3_4b.safetensors"
FLUX2_VAE = "flux2-vae.safetensors"
FLUX1_DEV = "flux1-dev.safetensors"
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
FLASHFACE = "flashface.ckpt"
CONTROLNET = "control_v11p_sd15_openpose.pth"
NEGATIVE = "blurry, lowres, bad anatomy, deformed face, watermark, text"
CONSISTENTID = "ConsistentID-v1.bin"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
FACE_PARSING = "face_parsing.pth"
#: ConsistentID's infer.py: its prompt wrapping and negative prompt (joined without a separator, as there).
CID_PROMPT = ("cinematic photo,{}, 50mm photograph, half-length portrait, film, bokeh, professional, 4k, "
              "highly detailed")
CID_NEGATIVE = ("monochrome, lowres, bad anatomy, worst quality, low quality, blurry((((ugly)))), (((duplicate))), "
                "((morbid)), ((mutilated)), [out of frame], extra fingers, mutated hands, ((poorly drawn hands)), "
                "((poorly drawn face)), (((mutation))), (((deformed))), ((ugly)), blurry, ((bad anatomy)), "
                "(((bad proportions))), ((extra limbs)), cloned face, (((disfigured))). out of frame, ugly, extra "
                "limbs, (bad anatomy), gross proportions, (malformed limbs), ((missing arms)), ((missing legs)), "
                "(((extra arms))), (((extra legs))), mutated hands, (fused fingers), (too many fingers), "
                "(((long neck)))")


class Graph(Builder):
    """Builder with the pieces every IDFusion example shares."""

    def base(self, prompt: str):
        self.ckpt = self.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
        self.positive = self.add("CLIPTextEncode", title="Prompt", text=prompt, clip=self.ckpt["CLIP"])
        self.negative = self.add("CLIPTextEncode", title="Negative prompt", text=NEGATIVE, clip=self.ckpt["CLIP"])
        self.analyzer = self.add("IDFusionFaceAnalysisLoader", pack="antelopev2", provider="auto", det_size=640)

    def identity(self, photos: list[str], label: str):
        """Photos of one person → face crops (one per photo) → an identity."""
        crops = None
        for photo in photos:
            image = self.add("LoadImage", title=f"{label}: {photo}", image=photo)
            faces = self.add("IDFusionFaceDetect", analyzer=self.analyzer[0], image=image["IMAGE"],
                             selection="largest", crop_size=224)
            crops = faces[1] if crops is None else self.add("ImageBatch", image1=crops, image2=faces[1])["IMAGE"]
        return self.add("IDFusionIdentity", title=label, crops=crops, label=label, size=224)[0]

    def features(self, refnet, identity):
        return self.add("IDFusionFaceFeatures", reference_net=refnet["REFERENCE_NET"], vae=self.ckpt["VAE"],
                        clip=self.ckpt["CLIP"], identity=identity, size=224, disk_cache=False)["FEATURES"]

    def ksampler(self, model, width: int, height: int, prefix: str, steps: int = 25, cfg: float = 7.0):
        latent = self.add("EmptyLatentImage", width=width, height=height, batch_size=1)
        out = self.add("KSampler", model=model, positive=self.positive[0], negative=self.negative[0],
                       latent_image=latent["LATENT"], seed=42, steps=steps, cfg=cfg, sampler_name="dpmpp_2m",
                       scheduler="karras", denoise=1.0)
        self.save(out["LATENT"], prefix)

    def guided(self, model, width: int, height: int, prefix: str, steps: int = 25):
        """FlashFace's sampling: three-way reference guidance, DDIM with uniform ('trailing') spacing."""
        guider = self.add("IDFusionReferenceGuider", model=model, positive=self.positive[0], negative=self.negative[0],
                          text_scale=7.5, reference_scale=2.0, lambda_before=0.85, launch_timestep=750, rescale=0.5)
        latent = self.add("EmptyLatentImage", width=width, height=height, batch_size=1)
        sampler = self.add("KSamplerSelect", sampler_name="ddim")
        sigmas = self.add("BasicScheduler", model=model, scheduler="ddim_uniform", steps=steps, denoise=1.0)
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
    identity = g.identity([f"idfusion_person_a_{i}.png" for i in range(1, 5)], "person A")
    features = g.features(refnet, identity)
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
    a = g.features(refnet, g.identity(["idfusion_person_a_1.png", "idfusion_person_a_2.png"], "person A"))
    b = g.features(refnet, g.identity(["idfusion_person_b_1.png", "idfusion_person_b_2.png"], "person B"))
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


class ConsistentIDGraph(Graph):
    """The ConsistentID pieces: its file, CLIP-ViT-H, buffalo_l and BiSeNet, one encoding per person."""

    def consistentid(self):
        self.ckpt = self.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
        self.cid = self.add("IDFusionConsistentIDLoader", weights=CONSISTENTID)[0]
        self.vision = self.add("CLIPVisionLoader", clip_name=CLIP_VISION)[0]
        self.analyzer = self.add("IDFusionFaceAnalysisLoader", pack="buffalo_l", provider="auto", det_size=640)
        self.parser = self.add("IDFusionFaceParsingLoader", model=FACE_PARSING)[0]

    def person(self, photo: str, label: str):
        image = self.add("LoadImage", title=f"{label}: {photo}", image=photo)
        return self.add("IDFusionConsistentIDFace", title=label, consistentid=self.cid, analyzer=self.analyzer[0],
                        parser=self.parser, image=image["IMAGE"], clip_vision=self.vision, label=label)[0]

    def prompts(self, faces, text: str, **region):
        return self.add("IDFusionConsistentIDConditioning", clip=self.ckpt["CLIP"], consistentid=self.cid, faces=faces,
                        text=CID_PROMPT.format(text), negative=CID_NEGATIVE, merge_at=0.6, **region)

    def official_sampler(self, model, positive, negative, width: int, height: int, prefix: str):
        """infer.py's sampling: Euler, 50 steps, CFG 5, seed 2024."""
        latent = self.add("EmptyLatentImage", width=width, height=height, batch_size=1)
        out = self.add("KSampler", model=model, positive=positive, negative=negative, latent_image=latent["LATENT"],
                       seed=2024, steps=50, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        self.save(out["LATENT"], prefix)


CID_MODELS = (f"Models: models/checkpoints/ (any SD1.5; the paper used Realistic Vision 6), models/consistentid/"
              f"{CONSISTENTID}, models/clip_vision/{CLIP_VISION}, models/insightface/models/buffalo_l/, "
              f"models/facexlib/{FACE_PARSING} (or facexlib's parsing_bisenet.pth).")


def consistentid_one_person(info) -> dict:
    g = ConsistentIDGraph(info)
    g.note("ConsistentID with the official defaults (infer.py): one photo, the fixed facial caption fused with the "
           "face's regions, 4 ID tokens in every cross-attention, the text-only prompt for steps 0-30 and the facial "
           f"prompt after (merge_at 0.6 of 50 Euler steps), CFG 5, 512x768.\n{CID_MODELS}")
    g.consistentid()
    face = g.person("idfusion_person_a_1.png", "person A")
    prompts = g.prompts(face, "A man, in a forest, adventuring")
    model = g.add("IDFusionConsistentIDApply", model=g.ckpt["MODEL"], consistentid=g.cid, faces=face,
                  id_strength=1.0, lora_strength=1.0)
    g.official_sampler(model["MODEL"], prompts[0], prompts[1], 512, 768, "consistentid")
    return g.workflow()


def consistentid_two_people(info) -> dict:
    g = ConsistentIDGraph(info)
    g.note("Two people with ConsistentID, person A on the left, person B on the right: each region's queries see "
           "only that person's ID tokens, and each person's facial prompt is restricted to their region; a scene "
           f"prompt covers the whole picture.\n{CID_MODELS}")
    g.consistentid()
    a, b = g.person("idfusion_person_a_1.png", "person A"), g.person("idfusion_person_b_1.png", "person B")
    both = g.add("IDFusionConsistentIDCombine", faces_1=a, weight_1=1.0, faces_2=b, weight_2=1.0)[0]
    masks = g.add("IDFusionMultiIDMasks", width=768, height=512, count=2, source="columns (left to right)",
                  overlap="earlier identity wins")["IDENTITY_MASKS"]
    left = g.prompts(a, "a man on the left", person=1, identity_masks=masks)
    right = g.prompts(b, "a woman on the right", person=2, identity_masks=masks)
    scene = g.add("CLIPTextEncode", title="Scene prompt", text="photo of two friends standing side by side on a "
                  "beach, sunset", clip=g.ckpt["CLIP"])
    people = g.add("ConditioningCombine", conditioning_1=left[0], conditioning_2=right[0])
    positive = g.add("ConditioningCombine", conditioning_1=people[0], conditioning_2=scene[0])
    negative = g.add("ConditioningCombine", conditioning_1=left[1], conditioning_2=right[1])
    model = g.add("IDFusionConsistentIDApply", model=g.ckpt["MODEL"], consistentid=g.cid, faces=both,
                  id_strength=1.0, lora_strength=1.0, identity_mode="by region (identity masks)", outside="none",
                  identity_masks=masks)
    g.official_sampler(model["MODEL"], positive[0], negative[0], 768, 512, "consistentid_two_people")
    return g.workflow()


def consistentid_reference_attention(info) -> dict:
    g = ConsistentIDGraph(info)
    g.note("ConsistentID and FlashFace-style reference attention on one MODEL: ConsistentID's LoRA and ID tokens, "
           "and self-attention over two reference photos of the same person (training-free: the checkpoint's own "
           f"UNet encodes them).\n{CID_MODELS}")
    g.consistentid()
    face = g.person("idfusion_person_a_1.png", "person A")
    prompts = g.prompts(face, "A man, in a forest, adventuring")
    refnet = g.add("IDFusionReferenceNetLoader", model=g.ckpt["MODEL"], weights="training-free (this MODEL's own UNet)")
    identity = g.identity(["idfusion_person_a_2.png", "idfusion_person_a_3.png"], "person A")
    features = g.features(refnet, identity)
    model = g.add("IDFusionConsistentIDApply", model=refnet["MODEL"], consistentid=g.cid, faces=face,
                  id_strength=1.0, lora_strength=1.0)
    model = g.add("IDFusionReferenceAttention", model=model["MODEL"], features=features, strength=0.6,
                  blocks="auto (FlashFace: decoder)")
    g.official_sampler(model["MODEL"], prompts[0], prompts[1], 512, 768, "consistentid_reference")


def dit_loaders(g: Graph, unet: str, vae: str, **text_encoder):
    """UNETLoader + the family's text-encoder loader (CLIPLoader or DualCLIPLoader) + VAELoader."""
    g.model = g.add("UNETLoader", unet_name=unet, weight_dtype="default")
    loader = "DualCLIPLoader" if "clip_name2" in text_encoder else "CLIPLoader"
    g.clip = g.add(loader, **text_encoder)
    g.vae = g.add("VAELoader", vae_name=vae)
    g.analyzer = g.add("IDFusionFaceAnalysisLoader", pack="antelopev2", provider="auto", det_size=640)


def dit_sample(g: Graph, model, positive, negative, latent, prefix: str, steps: int):
    out = g.add("KSampler", model=model, positive=positive, negative=negative, latent_image=latent, seed=42,
                steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    image = g.add("VAEDecode", samples=out["LATENT"], vae=g.vae[0])
    g.add("SaveImage", images=image["IMAGE"], filename_prefix=f"IDFusion/{prefix}")


def flux2_klein_two_people(info) -> dict:
    g = Graph(info)
    g.note("Two people in one picture with Flux.2 Klein (ComfyUI 0.17.0 or newer): each person's face crops "
           "become native reference images, person A on the left and person B on the right. Image tokens in a "
           "person's region attend only to that person's references (and the text); 'strength' sets how strongly "
           "each person's references act (1 = as the model does natively).\n"
           f"Models: models/diffusion_models/{FLUX2_KLEIN}, models/text_encoders/{QWEN3_4B}, models/vae/{FLUX2_VAE}, "
           "models/insightface/models/antelopev2/. Works the same with Flux.2 dev, Flux Kontext (Flux.1 loaders) "
           "and Qwen-Image-Edit; FluxKVCache may go before the IDFusion node.")
    dit_loaders(g, FLUX2_KLEIN, FLUX2_VAE, clip_name=QWEN3_4B, type="flux2")
    positive = g.add("CLIPTextEncode", title="Prompt", clip=g.clip[0],
                     text="photo of two friends laughing side by side in a cafe, natural light")
    negative = g.add("CLIPTextEncode", title="Negative prompt", clip=g.clip[0], text="")
    a = g.identity(["idfusion_person_a_1.png"], "person A")
    b = g.identity(["idfusion_person_b_1.png", "idfusion_person_b_2.png"], "person B")
    masks = g.add("IDFusionMultiIDMasks", width=1024, height=768, count=2, source="columns (left to right)",
                  overlap="earlier identity wins")
    people = g.add("IDFusionDiTIdentityReferences", model=g.model[0], positive=positive[0], negative=negative[0],
                   vae=g.vae[0], identity_1=a, strength_1=1.0, identity_2=b, strength_2=1.0, size=512, outside="all",
                   identity_masks=masks["IDENTITY_MASKS"])
    latent = g.add("EmptyFlux2LatentImage", width=1024, height=768, batch_size=1)
    dit_sample(g, people["MODEL"], people["positive"], people["negative"], latent["LATENT"], "flux2_klein_two_people",
               steps=4)
    return g.workflow()


def flux1_dev_training_free(info) -> dict:
    g = Graph(info)
    g.note("Training-free reference attention on Flux.1-dev (ComfyUI 0.17.0 or newer), which takes no reference "
           "images of its own: a reference pass of the face crops gives every block's reference keys/values, and "
           "each block's attention becomes (1−λ)·Attn(self) + λ·Attn(self + references) for the image. "
           "'reference_timestep: zero' runs the pass once per run and keeps it on the GPU (see docs/dit.md for "
           "its memory); 'current' repeats it every step as FlashFace does.\n"
           f"Models: models/diffusion_models/{FLUX1_DEV}, models/text_encoders/{CLIP_L} and {T5XXL}, models/vae/"
           f"{FLUX_VAE}, models/insightface/models/antelopev2/. Chroma works the same.")
    dit_loaders(g, FLUX1_DEV, FLUX_VAE, clip_name1=CLIP_L, clip_name2=T5XXL, type="flux")
    prompt = g.add("CLIPTextEncode", title="Prompt", clip=g.clip[0],
                   text="portrait photo of a woman as an astronaut, detailed, studio light")
    positive = g.add("FluxGuidance", conditioning=prompt[0], guidance=3.5)
    empty = g.add("CLIPTextEncode", title="Empty prompt", clip=g.clip[0], text="")
    identity = g.identity(["idfusion_person_b_1.png", "idfusion_person_b_2.png"], "person B")
    features = g.add("IDFusionDiTFaceFeatures", model=g.model[0], vae=g.vae[0], empty_prompt=empty[0],
                     identity=identity, size=512, disk_cache=False)
    model = g.add("IDFusionDiTReferenceAttention", model=g.model[0], features=features["FEATURES"], strength=0.85,
                  blocks="all (double + single)", reference_timestep="zero (once per run)")
    latent = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    dit_sample(g, model["MODEL"], positive[0], empty[0], latent["LATENT"], "flux1_dev_training_free", 20)
    return g.workflow()


GRAPHS = [flashface_four_references, training_free_sd15, identity_mixing, fused_kv_three_references, two_person_masks,
          pose_driven_personalization, consistentid_one_person, consistentid_two_people,
          consistentid_reference_attention, flux2_klein_two_people, flux1_dev_training_free]


def main() -> None:
    """Every graph the host can run (``MIN_COMFYUI``), or only those named on the command line."""
    wanted = set(sys.argv[1:])
    version = comfy_version()
    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(Path(tmp), name="make-workflows").start()
        try:
            info = server.object_info()
        finally:
            server.stop()
    WORKFLOWS.mkdir(exist_ok=True)
    for graph in GRAPHS:
        name = f"{graph.__name__}.json"
        if wanted and graph.__name__ not in wanted:
            continue
        if not runs_on(name, version):
            print(f"skipped {name}: needs {needs_text(name)} (run with a newer host: IDFUSION_HOST_NAME=0.33.0)")
            continue
        path = WORKFLOWS / name
        path.write_text(json.dumps(graph(info), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
