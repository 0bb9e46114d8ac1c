"""Test-only nodes, loaded by test servers beside the pack (never by users' ComfyUI): MODELs that
no checkpoint file small enough for the tests can give.

``IDFusionTestTinyModel``: a tiny SD1.5- or SDXL-layout MODEL with random weights (32 channels).
Its SDXL takes CLIP-L's 768-wide text features and an ADM vector of 768 + 6 · 256, so the
full-size random SD1.5 checkpoint's CLIP and VAE encode references for it: FEATURES of a real
SDXL family member, made by the pack's own nodes, without a 2.6 B-parameter UNet.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # tests/, for idf_testlib

SDXL_FOR_SD15_CLIP = dict(model_channels=32, context_dim=768, num_head_channels=8, adm_in_channels=768 + 6 * 256)
SD15_TINY = dict(model_channels=32, context_dim=768, num_heads=4)


class TinyModel:
    DESCRIPTION = "Test only: a tiny random-weight MODEL of the chosen family."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["SDXL", "SD1.5"], {"tooltip": "Model family."}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "Weight seed."})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, family, seed):
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models
        import torch
        from idf_testlib import models

        if family == "SDXL":
            config = comfy.supported_models.SDXL(models.sdxl_unet_config(**SDXL_FOR_SD15_CLIP))
        else:
            config = comfy.supported_models.SD15(models.sd15_unet_config(**SD15_TINY))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        models.init_weights(model.diffusion_model, seed)
        return (comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device()),)


NODE_CLASS_MAPPINGS = {"IDFusionTestTinyModel": TinyModel}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionTestTinyModel": "IDFusion test: tiny model"}
