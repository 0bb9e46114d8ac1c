"""Random-weight files of the DiT families in their real layouts, written once into the fixture
cache (never committed), for the DiT workflows and node tests:

- diffusion models (``models/diffusion_models``) that UNETLoader detects as Flux.1-dev and as
  Flux.2 Klein: the host's classes at a small depth and width (Flux's head width of 128 is
  kept: the host derives the head count from it), text width 768;
- their VAEs (``models/vae``) at full size: Flux's 16-channel one, Flux.2's 32-channel one with
  its latent batch norm (128 channels at 1/16 scale);
- a full-size random CLIP-L (``models/text_encoders``). Flux's T5-XXL and Flux.2's Qwen3 cannot
  be built on these machines; the tests load this CLIP-L in their place (``stand_in_text_encoders``),
  which is why the test models take 768-wide text. The shipped workflows keep the real loaders.
"""
import logging
import time
from pathlib import Path

import torch

from .host import boot
from .models import init_weights
from .paths import CACHE

FLUX_UNET = "idfusion-random-flux1-dev.safetensors"
FLUX2_UNET = "idfusion-random-flux2-klein.safetensors"
FLUX_VAE = "idfusion-random-flux-vae.safetensors"
FLUX2_VAE = "idfusion-random-flux2-vae.safetensors"
CLIP_L = "idfusion-random-clip-l.safetensors"

TEXT_WIDTH = 768
FLUX_FILE = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=TEXT_WIDTH, context_in_dim=TEXT_WIDTH,
                 hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
FLUX2_FILE = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=TEXT_WIDTH,
                  hidden_size=256, mlp_ratio=3.0, num_heads=2, depth=2, depth_single_blocks=2,
                  axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
                  txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
                  default_ref_method="index", ref_index_scale=10.0)

log = logging.getLogger("idfusion.tests")


def _write(path: Path, state_dict: dict, dtype=torch.float16) -> Path:
    import comfy.utils
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    comfy.utils.save_torch_file(sd, str(tmp))
    tmp.rename(path)
    return path


def _cached(folder: str, name: str, build) -> Path:
    path = CACHE / "models" / folder / name
    if not path.is_file():
        boot()
        start = time.monotonic()
        _write(path, build())
        log.info("wrote %s in %.1f s", path, time.monotonic() - start)
    return path


def _diffusion_model(config: dict, seed: int) -> dict:
    import comfy.supported_models as sm
    cls = sm.Flux2 if config["image_model"] == "flux2" else sm.Flux
    model_config = cls(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    return model.diffusion_model.state_dict()


def _vae(z_channels: int, batch_norm: bool, seed: int) -> dict:
    import comfy.ldm.models.autoencoder as ae
    ddconfig = {"double_z": True, "z_channels": z_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    if batch_norm:       # Flux.2: quant convs and a batch norm over the 2×2-patchified latent
        vae = ae.AutoencoderKL(ddconfig={**ddconfig, "batch_norm_latent": True}, embed_dim=z_channels)
    else:                # Flux.1 (ae.safetensors): encoder and decoder only
        target = "comfy.ldm.modules.diffusionmodules.model."
        regularizer = {"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"}
        vae = ae.AutoencodingEngine(regularizer_config=regularizer,
                                    encoder_config={"target": target + "Encoder", "params": ddconfig},
                                    decoder_config={"target": target + "Decoder", "params": ddconfig})
    init_weights(vae, seed)
    return vae.state_dict()


def _clip_l(seed: int) -> dict:
    import comfy.sd1_clip
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    init_weights(clip, seed)
    return {k.removeprefix("clip_l.transformer."): v for k, v in clip.state_dict().items() if "position_ids" not in k}


def flux_unet() -> Path:
    return _cached("diffusion_models", FLUX_UNET, lambda: _diffusion_model(FLUX_FILE, seed=11))


def flux2_unet() -> Path:
    return _cached("diffusion_models", FLUX2_UNET, lambda: _diffusion_model(FLUX2_FILE, seed=12))


def flux_vae() -> Path:
    return _cached("vae", FLUX_VAE, lambda: _vae(16, batch_norm=False, seed=13))


def flux2_vae() -> Path:
    return _cached("vae", FLUX2_VAE, lambda: _vae(32, batch_norm=True, seed=14))


def clip_l() -> Path:
    return _cached("text_encoders", CLIP_L, lambda: _clip_l(seed=15))


def all_files() -> list[Path]:
    return [flux_unet(), flux2_unet(), flux_vae(), flux2_vae(), clip_l()]


def load_vae(path: Path):
    """A VAE as VAELoader makes it."""
    import comfy.sd
    import comfy.utils
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))


#: Text-encoder loaders of the shipped DiT workflows that the test host cannot fill.
TEXT_ENCODER_LOADERS = ("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader")


def stand_in_text_encoders(prompt: dict) -> dict:
    """The API prompt with every text-encoder loader replaced by CLIPLoader(CLIP-L, stable_diffusion):
    same output socket (CLIP), so the graph is unchanged; the test models take its 768-wide text."""
    out = {}
    for node_id, node in prompt.items():
        if node["class_type"] in TEXT_ENCODER_LOADERS:
            node = {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_L, "type": "stable_diffusion"}}
        out[node_id] = node
    return out


def file_overrides(name: str, value):
    """Widget values of the shipped DiT workflows → the fixture files (None: keep the value)."""
    text = str(value).lower()
    if name == "unet_name":
        return FLUX2_UNET if "flux-2" in text or "flux2" in text else FLUX_UNET
    if name == "vae_name":
        return FLUX2_VAE if "flux2" in text or "flux-2" in text else FLUX_VAE
    return None
