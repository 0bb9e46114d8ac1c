"""ConsistentID fixtures generated at test time (never committed, never downloaded).

* ``official_groups``: the three groups of ``ConsistentID-v1.bin`` made by the test-side official
  modules (``consistentid_official``) with random values: the official keys, and the official
  shapes at the full size (``FULL``) or small ones (``TINY``) for the tiny UNets.
* ``write_checkpoint``: such groups as the release stores them (a pickle of three dicts; the
  ID projection in bf16 as released).
* ``tiny_clip_vision`` / ``clip_vision_h``: ComfyUI's own CLIP vision class with random weights,
  a small config in memory or the full CLIP-ViT-H-14 layout as a file Load CLIP Vision accepts.
* ``tiny_clip``: a ComfyUI CLIP object (SD1 tokenizer, a small CLIP-L-layout text model).
* ``parsing_weights``: a facexlib-layout BiSeNet whose head only picks skin, eyes, ears, nose and
  lips (so random features still yield every ConsistentID region), as ``face_parsing.pth``.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from . import consistentid_official as official
from .models import init_weights
from .paths import CACHE

TINY = dict(text_width=64, clip_width=64, face_dim=128, face_depth=2, proj_depth=2, rank=8)
FULL = dict(text_width=768, clip_width=1280, face_dim=1024, face_depth=8, proj_depth=4, rank=128)
#: UNet layouts: diffusers UNet2DConditionModel arguments (names only depend on these, widths on channels).
SD15_LAYOUT = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_LAYOUT = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 10))
CHECKPOINT = "ConsistentID-v1.bin"
CLIP_VISION_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
PARSER = "face_parsing.pth"
#: Labels the engineered parser chooses between (skin, left eye, left ear, nose, upper lip).
PARSER_LABELS = (1, 4, 7, 10, 12)


def diffusers_unet(channels, cross_attention_dim: int, layout=SD15_LAYOUT, heads: int = 8):
    """A diffusers UNet2DConditionModel in an SD-family layout (random weights)."""
    from diffusers import UNet2DConditionModel
    extra = {}
    if layout is SDXL_LAYOUT:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=8 * 6 + cross_attention_dim, use_linear_projection=True)
    return UNet2DConditionModel(sample_size=16, block_out_channels=tuple(channels), layers_per_block=2,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=heads,
                                norm_num_groups=min(32, channels[0]), **layout, **extra)


@functools.lru_cache(maxsize=4)
def processor_names(layout_name: str) -> tuple[str, ...]:
    """diffusers' ``unet.attn_processors`` names of a layout (from a small diffusers UNet)."""
    layout = {"sd15": SD15_LAYOUT, "sdxl": SDXL_LAYOUT}[layout_name]
    channels = (32, 32, 32, 32) if layout_name == "sd15" else (32, 32, 32)
    return tuple(diffusers_unet(channels, 32, layout).attn_processors)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: weights ~ N(0, 1/fan_in), norms near 1, biases near 0, LoRA up ~ N(0, 1/rank)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("latents"):
                values = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
            elif p.ndim >= 2:
                values = torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                values = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                values = 0.02 * torch.randn(p.shape, generator=gen)
            p.copy_(values)
    return module


def official_groups(names, block_out_channels, text_width: int, clip_width: int, face_dim: int, face_depth: int,
                    proj_depth: int, rank: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{"FacialEncoder", "image_proj", "adapter_modules"} as the official modules' state dicts."""
    image_proj = official.ProjPlusModel(cross_attention_dim=text_width, clip_embeddings_dim=clip_width,
                                        depth=proj_depth)
    facial = official.FacialEncoder(embedding_dim=clip_width, output_dim=text_width, embed_dim=text_width,
                                    dim=face_dim, depth=face_depth)
    adapter = official.adapter_modules(names, block_out_channels, text_width, rank)
    parts = {"FacialEncoder": facial, "image_proj": image_proj, "adapter_modules": adapter}
    return {name: {k: v.detach().clone() for k, v in randomize(module, seed + i).state_dict().items()}
            for i, (name, module) in enumerate(parts.items())}


def tiny_groups(layout_name: str = "sd15", seed: int = 0, **overrides) -> dict:
    """Official-layout groups for the tiny test UNets (``models.SD15_TINY`` / ``SDXL_TINY``)."""
    channels = (32, 64, 128, 128) if layout_name == "sd15" else (32, 64, 128)
    return official_groups(processor_names(layout_name), channels, **{**TINY, **overrides}, seed=seed)


def write_checkpoint(groups: dict, path: Path, dtype: torch.dtype | None = None) -> Path:
    """The release's file layout: a pickle of three dicts; ID projection bf16 (others ``dtype`` or fp32)."""
    stored = {}
    for name, sd in groups.items():
        cast = torch.bfloat16 if name == "image_proj" else (dtype or torch.float32)
        stored[name] = {k: v.to(cast).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(stored, tmp)
    tmp.rename(path)
    return path


def full_checkpoint() -> Path:
    """A full-size SD1.5 ConsistentID-v1.bin (official keys and shapes, random; LoRA and encoders fp16)."""
    path = CACHE / "models" / "consistentid" / CHECKPOINT
    if not path.is_file():
        groups = official_groups(processor_names("sd15"), (320, 640, 1280, 1280), **FULL)
        write_checkpoint(groups, path, dtype=torch.float16)
    return path


# --- CLIP vision and CLIP -------------------------------------------------------------------------------

TINY_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 64, "image_size": 224,
               "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128,
               "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
               "num_channels": 3, "num_hidden_layers": 3, "patch_size": 14, "projection_dim": 32}


def tiny_clip_vision(seed: int = 5):
    """ComfyUI's ClipVisionModel in a small CLIP-ViT config (224 px, 14 px patches: 257 tokens, 64 wide)."""
    import comfy.clip_vision
    path = CACHE / "tiny_clip_vision.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_VISION))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    init_weights(model.model, seed)
    return model


def clip_vision_h() -> Path:
    """A full-size CLIP-ViT-H-14 vision model file (random, fp16) that Load CLIP Vision detects as ViT-H."""
    path = CACHE / "models" / "clip_vision" / CLIP_VISION_H
    if path.is_file():
        return path
    import comfy.clip_vision
    import comfy.utils
    config = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json"
    model = comfy.clip_vision.ClipVisionModel(str(config))
    init_weights(model.model, seed=6)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    comfy.utils.save_torch_file(state, str(tmp))
    tmp.rename(path)
    return path


TINY_TEXT = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 49407,
             "hidden_act": "quick_gelu", "hidden_size": 64, "initializer_factor": 1.0, "initializer_range": 0.02,
             "intermediate_size": 128, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
             "model_type": "clip_text_model", "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1,
             "projection_dim": 64, "vocab_size": 49408}


def tiny_clip(seed: int = 7):
    """A ComfyUI CLIP: the SD1 tokenizer and a 64-wide, 2-layer CLIP-L-layout text model (random)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    clip_class = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=comfy.sd1_clip.SDClipModel,
                                   textmodel_json_config=dict(TINY_TEXT))
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, clip_class)
    clip = comfy.sd.CLIP(target=target)
    init_weights(clip.cond_stage_model, seed)
    return clip


# --- face parsing ------------------------------------------------------------------------------------------

def parser_state(labels=PARSER_LABELS, seed: int = 0) -> dict[str, torch.Tensor]:
    """facexlib BiSeNet weights: random, except that the main head scores only ``labels`` above zero."""
    from facexlib.parsing.bisenet import BiSeNet
    torch.manual_seed(seed)
    net = BiSeNet(num_class=19)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head = net.conv_out.conv_out.weight                               # [19, 256, 1, 1]; features are >= 0
        head.fill_(-1.0)
        for label in labels:
            head[label] = torch.randn(head[label].shape, generator=gen)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def parsing_weights() -> Path:
    path = CACHE / "models" / "facexlib" / PARSER
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(parser_state(), tmp)
        tmp.rename(path)
    return path


# --- one UNet call ---------------------------------------------------------------------------------------

def unet_eps(patcher, x: torch.Tensor, sigma: float, contexts: torch.Tensor, cond_or_uncond, y=None) -> torch.Tensor:
    """eps of one ``apply_model`` call as ``calc_cond_batch`` makes it (rows cond-major, the MODEL's
    wrappers and options prepared as a sampler prepares them), the patcher's weight patches (LoRA)
    merged by ComfyUI's own loader."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sampler_helpers
    comfy.model_management.load_models_gpu([patcher])
    options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    comfy.sampler_helpers.prepare_model_patcher(patcher, {}, options)
    rows = contexts.shape[0]
    sigmas = torch.full((rows,), float(sigma))
    transformer_options = dict(options["transformer_options"])
    transformer_options.update(cond_or_uncond=list(cond_or_uncond), uuids=[None] * len(cond_or_uncond),
                               sigmas=sigmas)
    extra = {} if y is None else {"y": y}
    denoised = patcher.model.apply_model(x, sigmas, c_crossattn=contexts, transformer_options=transformer_options,
                                         **extra)
    return (x - denoised) / sigma


def random_face(weights, seed: int = 0, regions=("Face", "Eye", "Ear", "Nose", "Lip")):
    """A ConsistentIDFace with random encodings shaped for ``weights`` (for UNet- and text-side tests);
    the unconditional ones are the same for every person, as real encodings' are."""
    from IDFusion.models.consistentid.face import ConsistentIDFace
    gen, null = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(12345)
    c, w = weights.text_width, weights.clip_width
    arcface = torch.nn.functional.normalize(torch.randn(512, generator=gen), dim=0)
    return ConsistentIDFace(f"p{seed}", weights.digest, arcface, torch.randn(257, w, generator=gen), tuple(regions),
                            torch.randn(len(regions), c, generator=gen), torch.randn(c, generator=null),
                            torch.randn(4, c, generator=gen), torch.randn(4, c, generator=null))
