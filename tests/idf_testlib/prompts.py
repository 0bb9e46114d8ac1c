"""API-format prompts for server tests, built node by node: ``p = Prompt(); ckpt = p.add(...)``;
``p.out(node, slot)`` links an output. Canonical graphs: ``reference_prompt`` (SD1.5, one face
crop photo, training-free or FlashFace reference attention, a KSampler, a saved image)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .models import SD15_CHECKPOINT
from .workflows import TEST_CROP_SIZE, TEST_IMAGE_SIZE

TRAINING_FREE = "training-free (this MODEL's own UNet)"
AUTO_BLOCKS = "auto (FlashFace: decoder)"
ALL_BLOCKS = "all (input + middle + output)"
TRAINING_FREE_ADAPTER = "training-free (self-attention projections)"
MIX, REGION = "mix (weights)", "by region (identity masks)"
EMPTY_PROMPT_CONTEXT = "empty prompt"
#: A face photo the ``prepared`` fixture puts in the server's input folder (idf_testlib/prepared.py).
FACE_PHOTO = "idfusion_person_a_1.png"


class Prompt(dict):
    def add(self, class_type: str, **inputs) -> str:
        node = str(len(self) + 1)
        self[node] = {"class_type": class_type, "inputs": inputs}
        return node

    @staticmethod
    def out(node: str, slot: int = 0) -> list:
        return [node, slot]


def checkpoint(p: Prompt, name: str = SD15_CHECKPOINT) -> str:
    return p.add("CheckpointLoaderSimple", ckpt_name=name)


def features(p: Prompt, refnet: list, ckpt: str, image: list, size: int = TEST_CROP_SIZE,
             disk_cache: bool = False, reference_count: int = 0) -> str:
    """Face Features on the empty-prompt reference context (the negative-prompt context is tested
    through the shipped FlashFace workflows)."""
    return p.add("IDFusionFaceFeatures", reference_net=refnet, vae=p.out(ckpt, 2), clip=p.out(ckpt, 1), images=image,
                 size=size, disk_cache=disk_cache, reference_context=EMPTY_PROMPT_CONTEXT,
                 reference_count=reference_count)


def reference_attention(p: Prompt, model: list, feats: list, **extra) -> str:
    inputs = dict(strength=0.85, start_percent=0.0, end_percent=1.0, blocks=AUTO_BLOCKS, identity_mode=MIX,
                  outside="all")
    inputs.update(extra)
    return p.add("IDFusionReferenceAttention", model=model, features=feats, **inputs)


def fused_kv(p: Prompt, model: list, feats: list, **extra) -> str:
    inputs = dict(weight=1.0, start_percent=0.0, end_percent=1.0, blocks=ALL_BLOCKS, adapter=TRAINING_FREE_ADAPTER,
                  identity_mode=MIX, outside="all")
    inputs.update(extra)
    return p.add("IDFusionFusedKV", model=model, features=feats, **inputs)


def sample_and_save(p: Prompt, model: list, ckpt: str, prefix: str, seed: int = 0, size: int = TEST_IMAGE_SIZE,
                    width: int | None = None) -> str:
    """KSampler (2 steps, euler, cfg 5) from an empty latent, decoded and saved; returns the SaveImage id."""
    positive = p.add("CLIPTextEncode", text="a portrait photo of a person", clip=p.out(ckpt, 1))
    negative = p.add("CLIPTextEncode", text="blurry", clip=p.out(ckpt, 1))
    latent = p.add("EmptyLatentImage", width=width or size, height=size, batch_size=1)
    sampled = p.add("KSampler", model=model, positive=p.out(positive), negative=p.out(negative),
                    latent_image=p.out(latent), seed=seed, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
                    denoise=1.0)
    decoded = p.add("VAEDecode", samples=p.out(sampled), vae=p.out(ckpt, 2))
    return p.add("SaveImage", images=p.out(decoded), filename_prefix=prefix)


def reference_prompt(prefix: str, ckpt_name: str = SD15_CHECKPOINT, lora: str | None = None,
                     flashface: str | None = None, photo: str = FACE_PHOTO, seed: int = 0,
                     disk_cache: bool = False) -> Prompt:
    """SD1.5 (optionally a LoRA, optionally FlashFace weights) with reference attention from one face
    photo used as the crop, sampled and saved."""
    p = Prompt()
    ckpt = checkpoint(p, ckpt_name)
    model = p.out(ckpt)
    if lora is not None:
        model = p.out(p.add("LoraLoaderModelOnly", model=model, lora_name=lora, strength_model=1.0))
    loader = p.add("IDFusionReferenceNetLoader", model=model, weights=flashface or TRAINING_FREE)
    image = p.add("LoadImage", image=photo)
    feats = features(p, p.out(loader, 1), ckpt, p.out(image), disk_cache=disk_cache)
    patched = reference_attention(p, p.out(loader), p.out(feats))
    sample_and_save(p, p.out(patched), ckpt, prefix, seed=seed)
    return p


def pixels(server, entry: dict) -> np.ndarray:
    """The one image a prompt saved, as an array."""
    files = server.output_images(entry)
    assert len(files) == 1, f"expected one saved image, got {files}"
    with Image.open(files[0]) as image:
        return np.asarray(image.convert("RGB")).copy()
