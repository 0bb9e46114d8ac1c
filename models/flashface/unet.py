"""FlashFace weights → ComfyUI objects: the fine-tuned UNet as a MODEL with five input
channels, and the ReferenceNet encoder/decoder plus the extra attentions A′ in a
ModelPatcher that ComfyUI loads and offloads with the model.

The FlashFace UNet is built as a plain ``BaseModel`` (not ComfyUI's inpainting variant,
which would feed mask + masked image into the extra channels): the face-position channel
is fed by IDFusion's ``apply_model`` wrapper.
"""
from __future__ import annotations

import torch

from ..host_patcher import wrap
from ..references import FlashFaceModules


def _dtypes(model_config, load_device):
    import comfy.model_management as mm
    dtype = mm.unet_dtype(model_params=0, supported_dtypes=model_config.supported_inference_dtypes)
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    return dtype, manual_cast


def build_unet_model(unet_sd: dict):
    """The fine-tuned FlashFace UNet as a ComfyUI ModelPatcher (five input channels)."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.supported_models

    # widths, depths and the five input channels as ComfyUI reads them off the weights; SD15's
    # config adds FlashFace's 8 heads (heads leave no trace in the shapes)
    model_config = comfy.supported_models.SD15(comfy.model_detection.detect_unet_config(unet_sd, ""))
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype, manual_cast = _dtypes(model_config, load_device)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.EPS, device=offload_device)
    return wrap(model, unet_sd, "FlashFace UNet (ComfyUI's SD1.5 layout)", into=model.diffusion_model)


class _ReferenceModules(torch.nn.Module):
    """Holder of the ReferenceNet's encoder/decoder and the extra attentions A′."""

    def __init__(self, input_blocks, output_blocks, extra_attention):
        super().__init__()
        self.input_blocks = input_blocks
        self.output_blocks = output_blocks
        self.extra_attention = extra_attention


def build_reference_modules(weights, model_patcher, source: str) -> FlashFaceModules:
    """ReferenceNet encoder/decoder (four input channels) and A′ per middle/decoder block."""
    import comfy.model_management as mm
    import comfy.ops
    from comfy.ldm.modules.attention import CrossAttention
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = model_patcher.model
    config = dict(base.model_config.unet_config)
    config["in_channels"] = weights.reference["input_blocks.0.0.weight"].shape[1]
    dtype = base.get_dtype()
    config["dtype"] = dtype          # set_inference_dtype already put "dtype" in unet_config
    operations = comfy.ops.pick_operations(dtype, base.manual_cast_dtype)
    offload = mm.unet_offload_device()
    ref_unet = UNetModel(**config, device=offload, operations=operations)
    heads = config["num_heads"]
    extra = torch.nn.ModuleDict()
    for key, tensors in weights.extra_attention.items():
        dim = tensors["to_q.weight"].shape[0]
        extra[f"{key[0]}_{key[1]}_{key[2]}"] = CrossAttention(query_dim=dim, heads=heads, dim_head=dim // heads, dtype=dtype,
                                                             device=offload, operations=operations)
    holder = _ReferenceModules(ref_unet.input_blocks, ref_unet.output_blocks, extra)
    sd = dict(weights.reference)
    for key, tensors in weights.extra_attention.items():
        sd.update({f"extra_attention.{key[0]}_{key[1]}_{key[2]}.{name}": t for name, t in tensors.items()})
    return FlashFaceModules(wrap(holder, sd, "FlashFace ReferenceNet (ComfyUI's SD1.5 layout)"), source)
