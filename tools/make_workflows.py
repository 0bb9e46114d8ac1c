#!/usr/bin/env python3
"""Regenerate the example workflows in workflows/ from the real host's /object_info.

    .host/0.33.0/venv/bin/python tools/make_workflows.py

Starts a test server of the newest host (tests/idf_testlib/server.py; the pack copies its sample
photos into the server's input folder), builds every graph below with the node definitions the
host reports (so widget order and sockets always match the code), opens each one in the
frontend (Debian's chromium) to measure every node as the canvas and the Vue-node renderers
draw it, lays the graph out with those sizes (tests/idf_testlib/layout.py), and writes
``workflows/<name>.json`` and the Templates menu's thumbnail ``workflows/<name>.jpg``.

A new example is a function below that builds a graph with ``Graph`` and ends with
``return g.workflow()``; add it to GRAPHS. Every workflow is run end to end by tests/e2e/test_workflows.py
and opened from the Templates menu and run by tests/browser/test_templates.py.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from PIL import Image  # noqa: E402

from idf_testlib.browser import RENDERERS, FrontendPage, launch_chromium, skip_first_visit  # noqa: E402
from idf_testlib.server import ComfyServer  # noqa: E402
from idf_testlib import layout  # noqa: E402
from idf_testlib.workflows import NOTE_TYPES, WORKFLOWS, Builder  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
FLUX2_KLEIN = "flux-2-klein-4b.safetensors"
QWEN3_4B = "qwen_3_4b.safetensors"
FLUX2_VAE = "flux2-vae.safetensors"
FLUX1_DEV = "flux1-dev.safetensors"
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
FLASHFACE = "flashface.ckpt"
CONTROLNET = "control_v11p_sd15_openpose_fp16.safetensors"
NEGATIVE = "blurry, lowres, bad anatomy, deformed face, watermark, text"
#: The sample photos (samples/, copied into ComfyUI's input folder by the pack at start-up).
ASTRONAUT = "idfusion_astronaut.png"
HOPPER = "idfusion_grace_hopper.jpg"
CHARACTER = "idfusion_character.png"
#: FlashFace's sampling over uniform ('simple') timesteps, and its face detection threshold.
SCHEDULER = "simple"
MIN_SCORE = 0.6
PROMPT_SIZE = (420, 200)
OUTPUT_SIZE = (420, 200)
THUMBNAIL = (512, 512)
#: The frontend command that hides its menus and panels, leaving the canvas.
FOCUS_MODE = "Workspace.ToggleFocusMode"
MODELS_FIRST = (f"**Set first (Models group):** *models/checkpoints/{CHECKPOINT}* or any SD1.5 checkpoint; "
                "*models/insightface/models/antelopev2/* (the face analysis pack).")
FLASHFACE_FIRST = f" *models/flashface/{FLASHFACE}* (the FlashFace release) in the ReferenceNet Loader."
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
CONSISTENTID_FIRST = (f"**Set first (Models group):** *models/checkpoints/{CHECKPOINT}* or any SD1.5 checkpoint (the "
                      f"paper used Realistic Vision 6); *models/consistentid/{CONSISTENTID}*; "
                      f"*models/clip_vision/{CLIP_VISION}*; *models/insightface/models/buffalo_l/*; "
                      f"*models/facexlib/{FACE_PARSING}* (or facexlib's parsing_bisenet.pth).")


class Graph(Builder):
    """Builder with the pieces every IDFusion example shares. ``workflow()`` lays the graph out with
    the node sizes main() measured in the frontend (``Graph.measured``; estimates before that)."""

    measured: dict[int, tuple[float, float]] | None = None

    def workflow(self) -> dict:
        return super().workflow(Graph.measured)

    def base(self, prompt: str):
        self.ckpt = self.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
        self.analyzer = self.add("IDFusionFaceAnalysisLoader", pack="antelopev2", provider="auto", det_size=640)
        self.positive = self.add("CLIPTextEncode", title="Prompt", text=prompt, clip=self.ckpt["CLIP"],
                                 min_size=PROMPT_SIZE)
        self.negative = self.add("CLIPTextEncode", title="Negative prompt", text=NEGATIVE, clip=self.ckpt["CLIP"],
                                 min_size=PROMPT_SIZE)

    def reference_net(self, weights: str):
        return self.add("IDFusionReferenceNetLoader", model=self.ckpt["MODEL"], weights=weights)

    def photo(self, name: str, title: str):
        return self.add("LoadImage", title=title, image=name)

    def faces(self, image, title: str | None = None):
        return self.add("IDFusionFaceDetect", title=title, analyzer=self.analyzer["face analyzer"], image=image,
                        selection="largest", min_score=MIN_SCORE, crop_size=224)

    def identity(self, photos: list[str], label: str):
        """Photos of one person → one face crop per photo, batched two by two → an identity."""
        crops = [self.faces(self.photo(name, f"{label}: photo {i}")["IMAGE"])["crops"]
                 for i, name in enumerate(photos, start=1)]
        while len(crops) > 1:
            pairs = [self.add("ImageBatch", image1=a, image2=b)["IMAGE"] for a, b in zip(crops[::2], crops[1::2])]
            crops = pairs + crops[len(pairs) * 2:]
        return self.add("IDFusionIdentity", title=label, crops=crops[0], label=label, size=224)["identity"]

    def features(self, refnet, identity):
        """Face Features; with FlashFace weights the reference pass runs with the negative prompt
        (the official reference context), training-free with the empty prompt (CLIP)."""
        flashface = refnet.widgets.get("weights") == FLASHFACE
        context = {"negative": self.negative[0]} if flashface else {"clip": self.ckpt["CLIP"]}
        return self.add("IDFusionFaceFeatures", reference_net=refnet["reference net"], vae=self.ckpt["VAE"],
                        identity=identity, size=224, disk_cache=False, **context)["features"]

    def empty_latent(self, width: int, height: int):
        return self.add("EmptyLatentImage", width=width, height=height, batch_size=1)["LATENT"]

    def ksampler(self, model, width: int, height: int, prefix: str):
        """Text to image with a plain KSampler, decoded and saved."""
        out = self.add("KSampler", model=model, positive=self.positive[0], negative=self.negative[0],
                       latent_image=self.empty_latent(width, height), seed=42, steps=25, cfg=7.0,
                       sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
        self.save(out["LATENT"], prefix)

    def guided(self, model, width: int, height: int, prefix: str):
        """Text to image with FlashFace's sampling, decoded and saved."""
        self.save(self.guided_sampling(model, self.empty_latent(width, height)), prefix)

    def guided_sampling(self, model, latent, denoise: float = 1.0):
        """FlashFace's sampling of ``latent``: three-way reference guidance, DDIM over the official
        'trailing' timesteps (the 'simple' scheduler: 999, 959, …, 39 for 25 steps)."""
        guider = self.add("IDFusionReferenceGuider", model=model, positive=self.positive[0], negative=self.negative[0],
                          text_scale=7.5, reference_scale=2.0, lambda_before=0.85, launch_timestep=750, rescale=0.5)
        sampler = self.add("KSamplerSelect", sampler_name="ddim")
        sigmas = self.add("BasicScheduler", model=model, scheduler=SCHEDULER, steps=25, denoise=denoise)
        noise = self.add("RandomNoise", noise_seed=42)
        out = self.add("SamplerCustomAdvanced", noise=noise["NOISE"], guider=guider["reference guider"],
                       sampler=sampler["SAMPLER"], sigmas=sigmas["SIGMAS"], latent_image=latent)
        return out["output"]

    def decode(self, latent):
        return self.add("VAEDecode", samples=latent, vae=self.ckpt["VAE"])["IMAGE"]

    def save(self, latent, prefix: str):
        self.save_image(self.decode(latent), prefix)

    def save_image(self, image, prefix: str):
        self.add("SaveImage", images=image, filename_prefix=f"IDFusion/{prefix}", min_size=OUTPUT_SIZE)


def flashface_four_references(info) -> dict:
    g = Graph(info)
    g.note("### FlashFace: one person from four reference photos\n"
           + MODELS_FIRST + FLASHFACE_FIRST + "\n\n"
           "**Then:** put four photos of your person in the Load Image nodes (they open on a public-domain "
           "sample photo), and write the prompt. The Face Position Mask says where the face goes (all zero = "
           "anywhere). Strength 0.75–1 and reference scale 2–2.5 balance likeness and prompt.")
    g.base("a photo of a woman wearing a suit, standing in a park, autumn, soft light")
    refnet = g.reference_net(FLASHFACE)
    features = g.features(refnet, g.identity([ASTRONAUT] * 4, "person A"))
    position = g.add("IDFusionFacePositionMask", width=768, height=768, x1=0.3, y1=0.1, x2=0.6, y2=0.4)
    model = g.add("IDFusionReferenceAttention", model=refnet["model to sample"], features=features, strength=0.85,
                  blocks="auto (FlashFace: decoder)", position_mask=position["position mask"])
    g.guided(model["patched model"], 768, 768, "flashface")
    return g.workflow()


def training_free_sd15(info) -> dict:
    g = Graph(info)
    g.note("### Training-free personalization on any SD1.5 checkpoint\n"
           + MODELS_FIRST + "\n\n"
           "The checkpoint's own UNet encodes the reference faces: no extra weights. Works with LoRAs and "
           "ControlNets; plain KSampler. **Then:** your photos in the Load Image nodes, and the prompt.")
    g.base("portrait photo of a woman as an astronaut, detailed, studio light")
    refnet = g.reference_net("training-free (this MODEL's own UNet)")
    features = g.features(refnet, g.identity([HOPPER, HOPPER], "person B"))
    model = g.add("IDFusionReferenceAttention", model=refnet["model to sample"], features=features, strength=0.6,
                  blocks="auto (FlashFace: decoder)")
    g.ksampler(model["patched model"], 512, 512, "training_free")
    return g.workflow()


def identity_mixing(info) -> dict:
    g = Graph(info)
    g.note("### Identity mixing (FlashFace supplement): two people blended by weight\n"
           + MODELS_FIRST + FLASHFACE_FIRST + "\n\n"
           "**Then:** photos of person A and person B. Move the weights of *IDFusion Combine Identities* to "
           "slide from one person to the other.")
    g.base("a photo of a person smiling, close-up portrait, natural light")
    refnet = g.reference_net(FLASHFACE)
    a = g.features(refnet, g.identity([ASTRONAUT, ASTRONAUT], "person A"))
    b = g.features(refnet, g.identity([HOPPER, HOPPER], "person B"))
    mixed = g.add("IDFusionCombineIdentities", features_1=a, weight_1=0.5, features_2=b, weight_2=0.5)
    model = g.add("IDFusionReferenceAttention", model=refnet["model to sample"], features=mixed["identities"],
                  strength=0.85, identity_mode="mix (weights)")
    g.guided(model["patched model"], 768, 768, "identity_mixing")
    return g.workflow()


def fused_kv_three_references(info) -> dict:
    g = Graph(info)
    g.note("### Fused keys/values (face fusion) from three reference photos\n"
           + MODELS_FIRST + "\n\n"
           "The faces join the text in every cross-attention under one softmax. Training-free projections by "
           "default; trained adapters go in *models/idfusion/*. **Then:** three photos of your person.")
    g.base("a photo of a woman reading a book in a cafe, cinematic")
    refnet = g.reference_net("training-free (this MODEL's own UNet)")
    features = g.features(refnet, g.identity([ASTRONAUT] * 3, "person A"))
    model = g.add("IDFusionFusedKV", model=refnet["model to sample"], features=features, weight=1.0,
                  blocks="all (input + middle + output)", adapter="training-free (self-attention projections)")
    g.ksampler(model["patched model"], 512, 512, "fused_kv")
    return g.workflow()


def two_person_masks(info) -> dict:
    g = Graph(info)
    g.note("### Two people in one picture, kept apart\n"
           + MODELS_FIRST + "\n\n"
           "Person A on the left, person B on the right: each region attends only to its own identity, in the "
           "fused keys/values and in reference attention. **Then:** photos of both people.")
    g.base("photo of two women standing side by side on a beach, sunset")
    refnet = g.reference_net("training-free (this MODEL's own UNet)")
    a = g.features(refnet, g.identity([ASTRONAUT, ASTRONAUT], "person A"))
    b = g.features(refnet, g.identity([HOPPER, HOPPER], "person B"))
    both = g.add("IDFusionCombineIdentities", features_1=a, weight_1=1.0, features_2=b, weight_2=1.0)
    masks = g.add("IDFusionMultiIDMasks", width=768, height=512, count=2, source="columns (left to right)",
                  overlap="earlier identity wins")
    fused = g.add("IDFusionFusedKV", model=refnet["model to sample"], features=both["identities"], weight=1.0,
                  identity_mode="by region (identity masks)", outside="none",
                  identity_masks=masks["identity masks"])
    model = g.add("IDFusionReferenceAttention", model=fused["patched model"], features=both["identities"],
                  strength=0.6, identity_mode="by region (identity masks)", outside="none",
                  identity_masks=masks["identity masks"])
    g.ksampler(model["patched model"], 768, 512, "two_people")
    return g.workflow()


def pose_driven_personalization(info) -> dict:
    g = Graph(info)
    g.note("### Pose-driven personalization (FaceSnap's landmark predictor)\n"
           + MODELS_FIRST + f" *models/controlnet/{CONTROLNET}* (an SD1.5 OpenPose ControlNet).\n\n"
           "Person A's face in the pose and expression of a driving photo: the Landmark Predictor keeps A's 3D "
           "face shape, takes head pose and expression from the driving face and draws OpenPose face keypoints "
           "for the ControlNet; reference attention, restricted to the driving face's position, keeps the "
           "likeness. **Then:** a photo of person A and a driving photo. With FlashFace weights pick "
           f"*{FLASHFACE}* in the ReferenceNet Loader.")
    g.base("a photo of a woman laughing, city street at night, bokeh, detailed skin")
    refnet = g.reference_net("training-free (this MODEL's own UNet)")
    source = g.faces(g.photo(ASTRONAUT, "person A")["IMAGE"], "person A: face")
    identity = g.add("IDFusionIdentity", title="person A", faces=source["faces"], label="person A", size=224)
    features = g.features(refnet, identity["identity"])
    driving_photo = g.photo(HOPPER, "driving pose")
    driving_image = g.add("ImageScale", image=driving_photo["IMAGE"], upscale_method="lanczos", width=512,
                          height=512, crop="center")
    driving = g.faces(driving_image["IMAGE"], "driving: face")
    landmarks = g.add("IDFusionLandmarkPredictor", source=source["faces"], driving=driving["faces"],
                      style="openpose_face", expression=1.0)
    controlnet = g.add("ControlNetLoader", control_net_name=CONTROLNET)
    conditioned = g.add("ControlNetApplyAdvanced", positive=g.positive[0], negative=g.negative[0],
                        control_net=controlnet[0], image=landmarks["control image"], strength=0.8,
                        start_percent=0.0, end_percent=0.8, vae=g.ckpt["VAE"])
    model = g.add("IDFusionReferenceAttention", model=refnet["model to sample"], features=features, strength=0.6,
                  blocks="auto (FlashFace: decoder)", position_mask=driving["position mask"])
    out = g.add("KSampler", model=model["patched model"], positive=conditioned[0], negative=conditioned[1],
                latent_image=g.empty_latent(512, 512), seed=42, steps=25, cfg=7.0, sampler_name="dpmpp_2m",
                scheduler="karras", denoise=1.0)
    g.save(out["LATENT"], "pose_driven")
    return g.workflow()


def flashface_face_swap(info) -> dict:
    g = Graph(info)
    g.note("### Face swap under a prompt (FlashFace's face inpainting)\n"
           + MODELS_FIRST + FLASHFACE_FIRST + "\n\n"
           "Person A's face painted into an existing photo: the target face's position mask tells FlashFace "
           "where the face goes, and only that region (grown a little) is repainted; the prompt can change "
           "the face (expression, glasses, age). **Then:** reference photos of person A and the target photo.")
    g.base("a photo of a smiling woman in a navy uniform, detailed face")
    refnet = g.reference_net(FLASHFACE)
    features = g.features(refnet, g.identity([ASTRONAUT, ASTRONAUT], "person A"))
    target_photo = g.photo(HOPPER, "target photo")
    target = g.add("ImageScale", title="target, 512 wide", image=target_photo["IMAGE"], upscale_method="lanczos",
                   width=512, height=0, crop="disabled")
    target_face = g.faces(target["IMAGE"], "target: face")
    region = g.add("GrowMask", title="region to repaint", mask=target_face["position mask"], expand=24,
                   tapered_corners=True)
    model = g.add("IDFusionReferenceAttention", model=refnet["model to sample"], features=features, strength=0.85,
                  blocks="auto (FlashFace: decoder)", position_mask=target_face["position mask"])
    encoded = g.add("VAEEncode", pixels=target["IMAGE"], vae=g.ckpt["VAE"])
    masked = g.add("SetLatentNoiseMask", samples=encoded["LATENT"], mask=region["MASK"])
    swapped = g.decode(g.guided_sampling(model["patched model"], masked["LATENT"], denoise=0.9))
    pasted = g.add("ImageCompositeMasked", title="paste the face back", destination=target["IMAGE"],
                   source=swapped, x=0, y=0, resize_source=False, mask=region["MASK"])
    g.save_image(pasted["IMAGE"], "face_swap")
    return g.workflow()


def flashface_character_to_real(info) -> dict:
    g = Graph(info)
    g.note("### A drawn or virtual character turned into a real person (FlashFace)\n"
           + MODELS_FIRST + FLASHFACE_FIRST + "\n\n"
           "The character's own face is the reference (one crop, as in the paper), and the drawing is the "
           "starting image (image-to-image, denoise 0.7): the result keeps the character's face shape and "
           "composition as a photo. **Then:** your character image, and a prompt describing a real photo.")
    g.base("a photo of a real elderly woman in a navy uniform, natural skin, detailed face, soft light")
    refnet = g.reference_net(FLASHFACE)
    drawing = g.photo(CHARACTER, "character")
    character = g.add("ImageScale", title="character, 512 x 512", image=drawing["IMAGE"], upscale_method="lanczos",
                      width=512, height=512, crop="center")
    face = g.faces(character["IMAGE"], "character: face")
    identity = g.add("IDFusionIdentity", title="character", faces=face["faces"], label="character", size=224)
    features = g.features(refnet, identity["identity"])
    model = g.add("IDFusionReferenceAttention", model=refnet["model to sample"], features=features, strength=0.85,
                  blocks="auto (FlashFace: decoder)", position_mask=face["position mask"])
    encoded = g.add("VAEEncode", pixels=character["IMAGE"], vae=g.ckpt["VAE"])
    g.save(g.guided_sampling(model["patched model"], encoded["LATENT"], denoise=0.7), "character_to_real")
    return g.workflow()


class ConsistentIDGraph(Graph):
    """The ConsistentID pieces: its file, CLIP-ViT-H, buffalo_l and BiSeNet, one encoding per person."""

    def consistentid(self):
        self.ckpt = self.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
        self.cid = self.add("IDFusionConsistentIDLoader", weights=CONSISTENTID)["consistentid"]
        self.vision = self.add("CLIPVisionLoader", clip_name=CLIP_VISION)[0]
        self.analyzer = self.add("IDFusionFaceAnalysisLoader", pack="buffalo_l", provider="auto", det_size=640)
        self.parser = self.add("IDFusionFaceParsingLoader", model=FACE_PARSING)["face parser"]

    def person(self, photo: str, label: str):
        image = self.photo(photo, label)
        return self.add("IDFusionConsistentIDFace", title=label, consistentid=self.cid,
                        analyzer=self.analyzer["face analyzer"], parser=self.parser, image=image["IMAGE"],
                        clip_vision=self.vision, label=label)["faces"]

    def prompts(self, faces, text: str, **region):
        return self.add("IDFusionConsistentIDConditioning", clip=self.ckpt["CLIP"], consistentid=self.cid, faces=faces,
                        text=CID_PROMPT.format(text), negative=CID_NEGATIVE, merge_at=0.6, min_size=PROMPT_SIZE,
                        **region)

    def official_sampler(self, model, positive, negative, width: int, height: int, prefix: str):
        """infer.py's sampling: Euler, 50 steps, CFG 5, seed 2024."""
        out = self.add("KSampler", model=model, positive=positive, negative=negative,
                       latent_image=self.empty_latent(width, height), seed=2024, steps=50, cfg=5.0,
                       sampler_name="euler", scheduler="normal", denoise=1.0)
        self.save(out["LATENT"], prefix)


def consistentid_one_person(info) -> dict:
    g = ConsistentIDGraph(info)
    g.note("### ConsistentID with the official defaults (infer.py)\n" + CONSISTENTID_FIRST + "\n\n"
           "One photo: the fixed facial caption fused with the face's regions, 4 ID tokens in every "
           "cross-attention, the text-only prompt for steps 0-30 and the facial prompt after (merge_at 0.6 of 50 "
           "Euler steps), CFG 5, 512x768. **Then:** a photo of your person, and the prompt.")
    g.consistentid()
    face = g.person(ASTRONAUT, "person A")
    prompts = g.prompts(face, "A woman, in a forest, adventuring")
    model = g.add("IDFusionConsistentIDApply", model=g.ckpt["MODEL"], consistentid=g.cid, faces=face,
                  id_strength=1.0, lora_strength=1.0)
    g.official_sampler(model["patched model"], prompts["positive"], prompts["negative"], 512, 768, "consistentid")
    return g.workflow()


def consistentid_two_people(info) -> dict:
    g = ConsistentIDGraph(info)
    g.note("### Two people with ConsistentID, kept apart\n" + CONSISTENTID_FIRST + "\n\n"
           "Person A on the left, person B on the right: each region's queries see only that person's ID tokens, "
           "and each person's facial prompt is restricted to their region; a scene prompt covers the whole "
           "picture. **Then:** a photo of each person.")
    g.consistentid()
    a, b = g.person(ASTRONAUT, "person A"), g.person(HOPPER, "person B")
    both = g.add("IDFusionConsistentIDCombine", faces_1=a, weight_1=1.0, faces_2=b, weight_2=1.0)["faces"]
    masks = g.add("IDFusionMultiIDMasks", width=768, height=512, count=2, source="columns (left to right)",
                  overlap="earlier identity wins")["identity masks"]
    left = g.prompts(a, "a woman on the left", person=1, identity_masks=masks)
    right = g.prompts(b, "a woman on the right", person=2, identity_masks=masks)
    scene = g.add("CLIPTextEncode", title="Scene prompt", text="photo of two friends standing side by side on a "
                  "beach, sunset", clip=g.ckpt["CLIP"], min_size=PROMPT_SIZE)
    people = g.add("ConditioningCombine", conditioning_1=left["positive"], conditioning_2=right["positive"])
    positive = g.add("ConditioningCombine", conditioning_1=people[0], conditioning_2=scene[0])
    negative = g.add("ConditioningCombine", conditioning_1=left["negative"], conditioning_2=right["negative"])
    model = g.add("IDFusionConsistentIDApply", model=g.ckpt["MODEL"], consistentid=g.cid, faces=both,
                  id_strength=1.0, lora_strength=1.0, identity_mode="by region (identity masks)", outside="none",
                  identity_masks=masks)
    g.official_sampler(model["patched model"], positive[0], negative[0], 768, 512, "consistentid_two_people")
    return g.workflow()


def consistentid_reference_attention(info) -> dict:
    g = ConsistentIDGraph(info)
    g.note("### ConsistentID and reference attention on one MODEL\n" + CONSISTENTID_FIRST + "\n\n"
           "ConsistentID's LoRA and ID tokens, and self-attention over two reference photos of the same person "
           "(training-free: the checkpoint's own UNet encodes them). **Then:** photos of your person.")
    g.consistentid()
    face = g.person(ASTRONAUT, "person A")
    prompts = g.prompts(face, "A woman, in a forest, adventuring")
    refnet = g.reference_net("training-free (this MODEL's own UNet)")
    features = g.features(refnet, g.identity([ASTRONAUT, ASTRONAUT], "person A"))
    model = g.add("IDFusionConsistentIDApply", model=refnet["model to sample"], consistentid=g.cid, faces=face,
                  id_strength=1.0, lora_strength=1.0)
    model = g.add("IDFusionReferenceAttention", model=model["patched model"], features=features, strength=0.6,
                  blocks="auto (FlashFace: decoder)")
    g.official_sampler(model["patched model"], prompts["positive"], prompts["negative"], 512, 768,
                       "consistentid_reference")
    return g.workflow()


class DiTGraph(Graph):
    """A DiT's own loaders (UNETLoader, its text encoder loader, VAELoader) and face analysis."""

    def dit(self, unet: str, vae: str, **text_encoder):
        self.model = self.add("UNETLoader", unet_name=unet, weight_dtype="default")["MODEL"]
        loader = "DualCLIPLoader" if "clip_name2" in text_encoder else "CLIPLoader"
        self.clip = self.add(loader, **text_encoder)["CLIP"]
        self.vae = self.add("VAELoader", vae_name=vae)["VAE"]
        self.analyzer = self.add("IDFusionFaceAnalysisLoader", pack="antelopev2", provider="auto", det_size=640)

    def encode(self, title: str, text: str):
        return self.add("CLIPTextEncode", title=title, clip=self.clip, text=text, min_size=PROMPT_SIZE)["CONDITIONING"]

    def sample(self, model, positive, negative, latent, prefix: str, steps: int):
        out = self.add("KSampler", model=model, positive=positive, negative=negative, latent_image=latent, seed=42,
                       steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
        image = self.add("VAEDecode", samples=out["LATENT"], vae=self.vae)["IMAGE"]
        self.save_image(image, prefix)


DIT_FIRST = "**Set first (Models group; ComfyUI 0.17.0 or newer):** "


def flux2_klein_two_people(info) -> dict:
    g = DiTGraph(info)
    g.note("### Two people in one picture with Flux.2 Klein\n"
           + DIT_FIRST + f"*models/diffusion_models/{FLUX2_KLEIN}*, *models/text_encoders/{QWEN3_4B}*, "
           f"*models/vae/{FLUX2_VAE}*, *models/insightface/models/antelopev2/*.\n\n"
           "Each person's face crops become native reference images, person A on the left and person B on the "
           "right: image tokens in a person's region attend only to that person's references (and the text); "
           "'strength' sets how strongly each person's references act (1 = as the model does natively). Works the "
           "same with Flux.2 dev, Flux Kontext (Flux.1 loaders) and Qwen-Image-Edit; FluxKVCache may go before the "
           "IDFusion node. **Then:** photos of both people, and the prompt.")
    g.dit(FLUX2_KLEIN, FLUX2_VAE, clip_name=QWEN3_4B, type="flux2")
    positive = g.encode("Prompt", "photo of two friends laughing side by side in a cafe, natural light")
    negative = g.encode("Negative prompt", "")
    a = g.identity([ASTRONAUT], "person A")
    b = g.identity([HOPPER, HOPPER], "person B")
    masks = g.add("IDFusionMultiIDMasks", width=1024, height=768, count=2, source="columns (left to right)",
                  overlap="earlier identity wins")
    people = g.add("IDFusionDiTIdentityReferences", model=g.model, positive=positive, negative=negative, vae=g.vae,
                   identity_1=a, strength_1=1.0, identity_2=b, strength_2=1.0, size=512, outside="all",
                   identity_masks=masks["identity masks"])
    latent = g.add("EmptyFlux2LatentImage", width=1024, height=768, batch_size=1)["LATENT"]
    g.sample(people["patched model"], people["positive"], people["negative"], latent, "flux2_klein_two_people", 4)
    return g.workflow()


def flux1_dev_training_free(info) -> dict:
    g = DiTGraph(info)
    g.note("### Training-free reference attention on Flux.1-dev\n"
           + DIT_FIRST + f"*models/diffusion_models/{FLUX1_DEV}*, *models/text_encoders/{CLIP_L}* and "
           f"*{T5XXL}*, *models/vae/{FLUX_VAE}*, *models/insightface/models/antelopev2/*. Chroma works the same.\n\n"
           "Flux.1-dev takes no reference images of its own: a reference pass of the face crops gives every block's "
           "reference keys/values, and each block's attention becomes (1−λ)·Attn(self) + λ·Attn(self + references) "
           "for the image. 'reference_timestep: zero' runs the pass once per run (see docs/dit.md for its memory); "
           "'current' repeats it every step as FlashFace does. **Then:** photos of your person, and the prompt.")
    g.dit(FLUX1_DEV, FLUX_VAE, clip_name1=CLIP_L, clip_name2=T5XXL, type="flux")
    prompt = g.encode("Prompt", "portrait photo of a woman as an astronaut, detailed, studio light")
    positive = g.add("FluxGuidance", conditioning=prompt, guidance=3.5)["CONDITIONING"]
    empty = g.encode("Empty prompt", "")
    identity = g.identity([HOPPER, HOPPER], "person B")
    features = g.add("IDFusionDiTFaceFeatures", model=g.model, vae=g.vae, empty_prompt=empty, identity=identity,
                     size=512, disk_cache=False)
    model = g.add("IDFusionDiTReferenceAttention", model=g.model, features=features["features"], strength=0.85,
                  blocks="all (double + single)", reference_timestep="zero (once per run)")
    latent = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)["LATENT"]
    g.sample(model["patched model"], positive, empty, latent, "flux1_dev_training_free", 20)
    return g.workflow()


GRAPHS = [flashface_four_references, training_free_sd15, identity_mixing, fused_kv_three_references, two_person_masks,
          pose_driven_personalization, flashface_face_swap, flashface_character_to_real, consistentid_one_person,
          consistentid_two_people, consistentid_reference_attention, flux2_klein_two_people, flux1_dev_training_free]


def measure(frontend: FrontendPage, workflow: dict, name: str) -> dict[int, tuple[float, float]]:
    """Each node's size as the frontend draws it, the larger of the two renderers'."""
    sizes: dict[int, tuple[float, float]] = {}
    for renderer in RENDERERS:
        frontend.use_renderer(renderer)
        frontend.load_graph(workflow, name)
        frontend.settle()
        for node_id, (width, height) in frontend.node_sizes().items():
            old = sizes.get(node_id, (0.0, 0.0))
            sizes[node_id] = (max(old[0], width), max(old[1], height))
    return sizes


def thumbnail(frontend: FrontendPage, workflow: dict, name: str, path: Path) -> None:
    """The Templates menu's picture: the whole graph as the canvas renderer draws it on opening
    (menus hidden, no missing-model marks), on a square of the canvas colour."""
    frontend.use_renderer("canvas")
    frontend.page.evaluate(f"() => window.app.extensionManager.command.execute('{FOCUS_MODE}')")
    frontend.page.evaluate("([w, n]) => window.app.loadGraphData(w, true, true, n, "
                           "{openSource: 'template', skipAssetScans: true})", [workflow, name])
    frontend.settle()
    scale, (offset_x, offset_y) = frontend.page.evaluate("() => [window.app.canvas.ds.scale, "
                                                         "Array.from(window.app.canvas.ds.offset)]")
    png = path.with_suffix(".png")
    frontend.page.screenshot(path=str(png))
    frontend.page.evaluate(f"() => window.app.extensionManager.command.execute('{FOCUS_MODE}')")
    left, top, width, height = workflow_bounds(workflow)
    box = [round((left + offset_x) * scale) - 8, round((top + offset_y) * scale) - 8,
           round((left + width + offset_x) * scale) + 8, round((top + height + offset_y) * scale) + 8]
    with Image.open(png) as shot:
        graph = shot.convert("RGB").crop(box)
        side = max(graph.size)
        square = Image.new("RGB", (side, side), shot.convert("RGB").getpixel((4, shot.height // 2)))
        square.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
        square.resize(THUMBNAIL, Image.Resampling.LANCZOS).save(path, quality=88)
    png.unlink()


def workflow_bounds(workflow: dict) -> list[float]:
    """[left, top, width, height] around the groups and the note, in graph units."""
    rects = [g["bounding"] for g in workflow["groups"]]
    rects += [layout.node_rect(n["pos"], n["size"]) for n in workflow["nodes"] if n["type"] in NOTE_TYPES]
    return layout.bounds(rects)


def main() -> None:
    WORKFLOWS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(Path(tmp), name="make-workflows").start()
        try:
            info = server.object_info()
            with launch_chromium() as browser:
                frontend = FrontendPage(browser, server.url)
                skip_first_visit(server.url)
                frontend.open("/")
                for make in GRAPHS:
                    Graph.measured = None
                    Graph.measured = measure(frontend, make(info), make.__name__)
                    workflow = make(info)
                    path = WORKFLOWS / f"{make.__name__}.json"
                    path.write_text(json.dumps(workflow, indent=1) + "\n")
                    thumbnail(frontend, workflow, make.__name__, path.with_suffix(".jpg"))
                    print(f"wrote {path} and its thumbnail")
                frontend.use_renderer("canvas")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
