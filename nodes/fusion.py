"""Fused-KV injector: reference-face keys/values joined to the text keys/values of
cross-attention (face-fusion), training-free or with trained adapter weights."""
from __future__ import annotations

import logging
import os

import folder_paths
from .api import io

from . import types
from .errors import from_input
from .loaders import register_folder
from .reference import (add_to_plan, build_routing, check_features_fit, check_patch_inputs,
                        routing_inputs)
from .unet_blocks import ALL, SELECTIONS, attn2_replace, block_table, select_blocks, set_attn2_replace, transformer_blocks

logger = logging.getLogger("IDFusion")

ADAPTER_FOLDER = "idfusion"
TRAINING_FREE_ADAPTER = "training-free (self-attention projections)"
NODE = "IDFusionFusedKV"
DISPLAY_NAME = "IDFusion Fused KV"

register_folder(ADAPTER_FOLDER, {".safetensors"})


def adapter_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(ADAPTER_FOLDER) if f.endswith(".safetensors")]


class FusedKV(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE,
            display_name=DISPLAY_NAME,
            category="IDFusion/fusion",
            description="Patches a clone of the MODEL so cross-attention's keys/values become [K_text; K_face...], "
                        "[V_text; V_face...] under one softmax, with K_face = Linear_kf(h_f), V_face = Linear_vf(h_f) "
                        "from each reference's hidden state at that block (read from the cached reference pass).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to patch."),
                types.ReferenceFeatures.Input("features", tooltip="From 'IDFusion Face Features' or 'IDFusion Combine Identities'."),
                io.Float.Input("weight", default=1.0, min=0.0, max=5.0, step=0.01,
                               tooltip="Scales the attention the face keys receive (a log-bias on their logits); 0 = off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the faces join."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the faces leave."),
                io.Combo.Input("blocks", options=list(SELECTIONS), default=ALL,
                               tooltip="Which transformer blocks' cross-attention gets face keys/values."),
                io.Combo.Input("adapter", options=[TRAINING_FREE_ADAPTER] + adapter_files(), default=TRAINING_FREE_ADAPTER,
                               tooltip="Linear_kf/Linear_vf: training-free (the block's own self-attention key/value "
                                       "projections) or trained per-block weights from models/idfusion (see README)."),
                *routing_inputs(),
            ],
            outputs=[io.Model.Output(display_name="patched model",
                                     tooltip="The patched clone; the input MODEL is untouched.")],
        )

    @classmethod
    def execute(cls, model, features, weight, start_percent, end_percent, blocks, adapter, identity_mode, outside,
                identity_masks=None) -> io.NodeOutput:
        from ..models.engine import Spec

        check_patch_inputs(NODE, model, start_percent, end_percent)
        check_features_fit(NODE, model, features)
        routing = build_routing(NODE, features, identity_mode, identity_masks, outside)
        m = model.clone()
        selected = select_blocks(block_table(m), blocks)
        spec = Spec("fused_kv", features, selected, "attn2", weight, start_percent, end_percent, routing, DISPLAY_NAME)
        projections = load_projections(m, selected, adapter)
        patch_fused_kv(m, spec, projections)
        add_to_plan(m, spec)
        return io.NodeOutput(m)


def load_projections(m, blocks, adapter: str):
    """{block key: (Linear_kf, Linear_vf)} and the host patcher that owns them; training-free:
    {block key: None} (the patch takes the self-attention projections of the UNet being run)."""
    if adapter == TRAINING_FREE_ADAPTER:
        return dict.fromkeys(blocks), None
    modules = transformer_blocks(m.model.diffusion_model)
    from ..models.fusion.adapter import load_adapter

    path = folder_paths.get_full_path(ADAPTER_FOLDER, adapter)
    if path is None:
        raise FileNotFoundError(f"{NODE}: adapter '{adapter}' is not in models/{ADAPTER_FOLDER}; put it there and "
                                f"refresh the node list")
    dims = {k: (modules[k].attn1.to_k.weight.shape[1], modules[k].attn2.to_k.weight.shape[0]) for k in blocks}
    with from_input(NODE, "adapter"):
        layers, patcher = load_adapter(path, dims, m.model)
    logger.info("IDFusion: fused-KV adapter %s (%d blocks)", os.path.basename(path), len(layers))
    return layers, patcher


def patch_fused_kv(m, spec, projections) -> None:
    from ..models.patches import FusedKV as FusedKVPatch

    layers, patcher = projections
    for key in spec.blocks:
        existing = attn2_replace(m, key)
        outer = existing if getattr(existing, "wraps_attn2", False) else None     # e.g. ConsistentID's ID tokens
        if outer is not None:
            existing = outer.inner
        if isinstance(existing, FusedKVPatch):
            patch = existing.with_entry(spec, layers[key], patcher)
        else:
            if existing is not None:
                logger.warning("IDFusion: replacing another node's cross-attention patch on block %s", key)
            patch = FusedKVPatch(key, ((spec, layers[key]),), (patcher,) if patcher is not None else ())
        set_attn2_replace(m, outer.with_inner(patch) if outer is not None else patch, key)


NODES = [FusedKV]
