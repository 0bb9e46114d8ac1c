"""Loader nodes: the ReferenceNet (training-free or FlashFace weights)."""
from __future__ import annotations

import logging
import os

import folder_paths
from .api import io

from . import types
from .unet_blocks import add_attn1_output_patch, add_attn1_patch, block_table, require_unet, set_apply_model_wrapper

logger = logging.getLogger("IDFusion")

TRAINING_FREE_CHOICE = "training-free (this MODEL's own UNet)"
FLASHFACE_FOLDER = "flashface"
WEIGHT_EXTENSIONS = {".ckpt", ".pt", ".pth", ".safetensors"}


def register_folder(name: str, extensions: set[str]) -> None:
    """A model folder ``models/<name>`` through folder_paths (kept if the user configured one)."""
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(extensions))


register_folder(FLASHFACE_FOLDER, WEIGHT_EXTENSIONS)


class ReferenceNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionReferenceNetLoader",
            display_name="IDFusion ReferenceNet Loader",
            category="IDFusion/loaders",
            description="Chooses the network that encodes reference faces. Training-free: the MODEL's own UNet "
                        "(any SD1.5 or SDXL checkpoint, shared weights). FlashFace: the official FlashFace "
                        "checkpoint from models/flashface, which also replaces the MODEL's UNet with FlashFace's "
                        "fine-tuned one (apply LoRAs after this node).",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL. Training-free: its UNet encodes the references. "
                                                "FlashFace: an SD1.5 checkpoint whose CLIP and VAE you keep using."),
                io.Combo.Input("weights", options=[TRAINING_FREE_CHOICE] + folder_paths.get_filename_list(FLASHFACE_FOLDER),
                               default=TRAINING_FREE_CHOICE,
                               tooltip="'training-free', or a FlashFace checkpoint in models/flashface "
                                       "(flashface.ckpt, or a .safetensors made by tools/convert_flashface.py)."),
            ],
            outputs=[
                io.Model.Output(display_name="model to sample",
                                tooltip="The MODEL to sample (FlashFace's UNet when FlashFace weights are chosen)."),
                types.ReferenceNet.Output(display_name="reference net", tooltip="Feed it to 'IDFusion Face Features'."),
            ],
        )

    @classmethod
    def execute(cls, model, weights) -> io.NodeOutput:
        from ..models.references import TRAINING_FREE, ReferenceNet

        require_unet(model, "IDFusionReferenceNetLoader")
        if weights == TRAINING_FREE_CHOICE:
            refnet = ReferenceNet(TRAINING_FREE, "training-free", model_patcher=model)
            return io.NodeOutput(model, refnet)
        path = folder_paths.get_full_path(FLASHFACE_FOLDER, weights)
        if path is None:
            raise FileNotFoundError(f"IDFusionReferenceNetLoader: weights '{weights}' is not in models/{FLASHFACE_FOLDER}; "
                                    f"put the FlashFace checkpoint there and refresh the node list")
        flashface_model, refnet = load_flashface(path)
        return io.NodeOutput(flashface_model, refnet)


def load_flashface(path: str):
    """(MODEL, ReferenceNet) from a FlashFace checkpoint, with A′ patched onto the UNet."""
    import comfy.utils

    from ..models.flashface.unet import build_reference_modules, build_unet_model
    from ..models.flashface.weights import load_flashface as read_weights
    from ..models.patches import FlashFaceAttention
    from ..models.engine import apply_model_wrapper
    from ..models.references import FLASHFACE, ReferenceNet

    bar = comfy.utils.ProgressBar(100)
    weights = read_weights(path, progress=lambda done, total: bar.update_absolute(int(80 * done / max(total, 1)), 100))
    model = build_unet_model(weights.unet)
    modules = build_reference_modules(weights, model, source=weights.source)
    bar.update_absolute(95, 100)
    blocks = tuple(k for k in block_table(model) if modules.has_extra_attention(k))
    patch = FlashFaceAttention(modules, blocks)
    add_attn1_patch(model, patch.capture)
    add_attn1_output_patch(model, patch)
    set_apply_model_wrapper(model, apply_model_wrapper)
    bar.update_absolute(100, 100)
    logger.info("IDFusion: FlashFace loaded from %s (%d extra attentions)", os.path.basename(path), len(blocks))
    refnet = ReferenceNet(FLASHFACE, os.path.basename(path), modules=modules, model_patcher=model)
    return model, refnet


NODES = [ReferenceNetLoader]
