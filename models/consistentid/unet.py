"""ConsistentID on a ComfyUI UNet: the LoRA through the host's LoRA loader, the model check, and
the ID tokens of one or several people.

``processors`` is the UNet's attentions in diffusers' ``attn_processors`` order
(``nodes.unet_blocks.attention_processors``): ``[(diffusers name, block key, "attn1"|"attn2")]``.
Processor i of the checkpoint belongs to the i-th entry.
"""
from __future__ import annotations

import torch

from .face import ConsistentIDFaces
from .weights import ConsistentIDWeights

#: The four projections each LoRA'd attention has, as ComfyUI names their weights.
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_state_dict(weights: ConsistentIDWeights, processors: list) -> dict[str, torch.Tensor]:
    """The adapter's LoRA under diffusers' processor names, the form ``comfy.lora`` reads natively:
    ``unet.<name>.processor.to_q_lora.down.weight`` etc. (no alpha: scale 1)."""
    return {f"unet.{name}.processor.{key}": value
            for i, (name, _, _) in enumerate(processors) for key, value in weights.lora[i].items()}


def lora_patches(model_patcher, weights: ConsistentIDWeights, processors: list) -> dict:
    """Weight patches for ``ModelPatcher.add_patches``: every LoRA key matched to a UNet weight."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    patches = comfy.lora.load_lora(lora_state_dict(weights, processors), key_map, log_missing=True)
    expected = {target_weight(key, attn, p) for _, key, attn in processors for p in PROJECTIONS}
    if set(patches) != expected:
        missing = sorted(expected - set(patches))
        raise RuntimeError(f"IDFusion: ConsistentID's LoRA matched {len(set(patches) & expected)} of {len(expected)} "
                           f"UNet weights (e.g. {missing[:2]} unmatched); please report this")
    return patches


def target_weight(key: tuple, attn: str, projection: str) -> str:
    """ComfyUI's state-dict name of one attention projection weight of block ``key``."""
    part, number, index = key
    place = {"input": f"input_blocks.{number}.1", "middle": "middle_block.1", "output": f"output_blocks.{number}.1"}
    return f"diffusion_model.{place[part]}.transformer_blocks.{index}.{attn}.{projection}.weight"


def check_model(weights: ConsistentIDWeights, processors: list, blocks: dict, node: str) -> None:
    """The MODEL has the attentions (count and widths) the checkpoint was trained on."""
    if len(processors) != weights.processors:
        raise ValueError(f"{node}: 'consistentid' ({weights.name}) is the {weights.variant} release "
                         f"({weights.processors} attentions) but 'model' has {len(processors)} attentions; use the "
                         f"ConsistentID file made for this model family")
    for i, (name, key, attn) in enumerate(processors):
        module = getattr(blocks[key], attn)
        width = module.to_q.weight.shape[0]
        if width != weights.hidden[i]:
            raise ValueError(f"{node}: attention {name} of 'model' is {width} wide but {weights.name} was made for "
                             f"{weights.hidden[i]}; use the ConsistentID file made for this model")
        if attn == "attn2" and module.to_k.weight.shape[1] != weights.text_width:
            raise ValueError(f"{node}: 'model' reads {module.to_k.weight.shape[1]}-wide text features but "
                             f"{weights.name} makes {weights.text_width}-wide ID tokens; use a matching model")


def faces_tokens(faces: ConsistentIDFaces, mixed: bool) -> torch.Tensor:
    """ID tokens [M, T, C]: one set per person, or (``mixed``) one set from the weighted blend of their
    ArcFace embeddings and CLIP states (the hybrid-guidance paper's identity mixing, Σ w_i e_i)."""
    if not mixed or faces.count == 1:
        return torch.stack([f.id_tokens for f in faces.faces])
    weights = faces.weights
    mix = faces.mix()
    arcface = torch.einsum("m,md->d", mix, torch.stack([f.arcface for f in faces.faces]))
    states = torch.einsum("m,mnd->nd", mix, torch.stack([f.clip_states for f in faces.faces]))
    modules = weights.loaded_encoders()
    param = next(modules.parameters())
    with torch.no_grad():
        tokens = modules.image_proj(arcface[None].to(param.device, param.dtype),
                                    states[None].to(param.device, param.dtype), shortcut=weights.shortcut)
    return tokens.float().cpu()
