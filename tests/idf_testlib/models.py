"""Random-weight models in the real layouts, built with ComfyUI's own classes.

ComfyUI builds layers without initialising them (``comfy.ops.disable_weight_init``), so
every parameter is filled here from a seeded generator: weights ~ N(0, 1/fan_in), norms
near 1, biases near 0. Tiny models are built in memory; the full-size SD1.5 checkpoint is
written once into the fixture cache and reused.
"""
import logging
import math
import time
from pathlib import Path

import torch

from .host import boot
from .paths import CACHE

SD15_TINY = dict(model_channels=32, context_dim=64, num_heads=4)
SDXL_TINY = dict(model_channels=32, context_dim=64, num_head_channels=8, adm_in_channels=96)


def init_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter deterministically (ComfyUI leaves them uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                values = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            elif name.endswith("weight"):
                values = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                values = 0.02 * torch.randn(p.shape, generator=gen)
            p.copy_(values.to(p.dtype))
    return module


def sd15_unet_config(model_channels=320, context_dim=768, num_heads=8, in_channels=4):
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": in_channels, "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": context_dim, "num_heads": num_heads, "num_head_channels": -1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sdxl_unet_config(model_channels=320, context_dim=2048, num_head_channels=64, adm_in_channels=2816):
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": adm_in_channels, "in_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": context_dim, "num_head_channels": num_head_channels, "num_heads": -1,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def _patcher(model_config_cls, unet_config, seed):
    boot()
    import comfy.model_management as mm
    import comfy.model_patcher
    model_config = model_config_cls(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_sd15(seed: int = 0, in_channels: int = 4):
    """A ModelPatcher around a tiny SD1.5-layout UNet (same blocks as SD1.5, 32 channels)."""
    boot()
    import comfy.supported_models
    return _patcher(comfy.supported_models.SD15, sd15_unet_config(in_channels=in_channels, **SD15_TINY), seed)


def tiny_sdxl(seed: int = 0):
    """A ModelPatcher around a tiny SDXL-layout UNet (SDXL's block and depth layout, 32 channels)."""
    boot()
    import comfy.supported_models
    return _patcher(comfy.supported_models.SDXL, sdxl_unet_config(**SDXL_TINY), seed)


def tiny_vae(seed: int = 0):
    """A ComfyUI VAE around a random-weight TAESD (the host's own small autoencoder class, found by
    ``comfy.sd.VAE`` from its key names): 8× down, 4 latent channels, deterministic encoding."""
    boot()
    import comfy.sd
    import comfy.taesd.taesd
    taesd = init_weights(comfy.taesd.taesd.TAESD(latent_channels=4), seed)
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    return comfy.sd.VAE(sd={k: v.detach().clone() for k, v in taesd.state_dict().items()})


def checkpoint_state_dict(patcher, clip_sd=None, vae_sd=None) -> dict:
    """A checkpoint's state dict written the way this host's own ``comfy.sd.save_checkpoint``
    writes it: ``ModelPatcher.state_dict_for_saving(clip, vae)`` on hosts that have it (the
    BaseModel method then wants the UNet's state dict first), else the BaseModel's method."""
    if hasattr(patcher, "state_dict_for_saving"):
        return patcher.state_dict_for_saving(clip_sd, vae_sd)
    return patcher.model.state_dict_for_saving(clip_sd, vae_sd)


SD15_CHECKPOINT = "idfusion-random-sd15.safetensors"


def sd15_checkpoint() -> Path:
    """A full-size random SD1.5 checkpoint (UNet, CLIP-L, VAE) that CheckpointLoaderSimple loads."""
    path = CACHE / "models" / "checkpoints" / SD15_CHECKPOINT
    if path.is_file():
        return path
    boot()
    import comfy.ldm.models.autoencoder as ae
    import comfy.model_patcher
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils
    start = time.monotonic()
    model_config = comfy.supported_models.SD15(sd15_unet_config())
    model_config.set_inference_dtype(torch.float16, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed=1)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float16)
    init_weights(clip, seed=2)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = ae.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights(vae, seed=3)
    clip_sd = {k: v for k, v in clip.state_dict().items() if "position_ids" not in k}
    sd = checkpoint_state_dict(patcher, clip_sd, vae.state_dict())
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    comfy.utils.save_torch_file(sd, str(tmp))
    tmp.rename(path)
    logging.getLogger("idfusion.tests").info("wrote %s in %.1f s", path, time.monotonic() - start)
    return path
