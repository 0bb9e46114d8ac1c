"""A loaded ConsistentID file: its modules under ComfyUI's memory management and its LoRA.

``checkpoint`` reads and checks the file; here the groups become modules: the ID projection and
the FacialEncoder (``EncoderModules``, used while encoding faces and prompts) and the ID-token
key/value layers (``AdapterLayers``, loaded with the UNet), each in a ModelPatcher, and the LoRA
tensors per attention processor.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..references import Shared
from .checkpoint import (VARIANTS, WHERE, check_groups, file_digest, group, normalized, parse_adapter, read_file,
                         summary)
from .modules import FacialEncoder, IDProjection, build_facial_encoder, build_id_projection

logger = logging.getLogger("IDFusion")


class IPLayer(nn.Module):
    """The ID-token key/value projections of one cross-attention: [hidden, C] each, no bias."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.to_k_ip = nn.Linear(width, hidden, bias=False)
        self.to_v_ip = nn.Linear(width, hidden, bias=False)


class AdapterLayers(nn.Module):
    """``layers[str(i)]``: the IPLayer of attention processor i (cross-attentions only)."""

    def __init__(self, layers: dict[int, IPLayer]):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})


class EncoderModules(nn.Module):
    def __init__(self, image_proj: IDProjection, facial_encoder: FacialEncoder):
        super().__init__()
        self.image_proj = image_proj
        self.facial_encoder = facial_encoder


@dataclass(frozen=True, eq=False)
class ConsistentIDWeights(Shared):
    """A loaded ConsistentID file.

    encoders: ModelPatcher around ``EncoderModules`` (ID projection, FacialEncoder), used while
    encoding faces and prompts. adapter: ModelPatcher around ``AdapterLayers``, loaded with the
    UNet by the ID-token patches. lora: per processor i, ``{"to_q_lora.down.weight": [r, in], …}``.
    hidden: per processor, its attention's width. text_width: C; clip_width: W.
    """

    name: str
    digest: str
    variant: str
    encoders: object
    adapter: object
    lora: dict
    hidden: tuple
    text_width: int
    clip_width: int
    rank: int

    @property
    def processors(self) -> int:
        return len(self.hidden)

    @property
    def shortcut(self) -> bool:
        """The SDXL release adds the projection's input tokens back (``shortcut=True``)."""
        return self.variant == "SDXL"

    def loaded_encoders(self) -> EncoderModules:
        """The encoder modules on their load device (ComfyUI's memory management)."""
        import comfy.model_management
        comfy.model_management.load_models_gpu([self.encoders])
        return self.encoders.model


def _build(builder, sd: dict, group_name: str, name: str):
    try:
        return builder(sd)
    except (KeyError, RuntimeError, IndexError) as error:
        detail = str(error).splitlines()[0][:400]
        raise ValueError(f"{name}: the {group_name} group does not match ConsistentID's {group_name} ({detail}); "
                         f"found {summary(sd)}. {WHERE}") from error


def from_groups(groups: dict, name: str, digest: str) -> ConsistentIDWeights:
    """Check the three groups, build the modules and wrap them for ComfyUI's memory management."""
    check_groups(groups, name)
    groups = normalized(groups)
    lora, ip = parse_adapter(groups["adapter_modules"], name)
    image_proj = _build(build_id_projection, groups["image_proj"], "image_proj", name)
    facial = _build(build_facial_encoder, groups["FacialEncoder"], "FacialEncoder", name)
    width = image_proj.width
    hidden = tuple(int(lora[i]["to_q_lora.up.weight"].shape[0]) for i in sorted(lora))
    clip_width = image_proj.perceiver_resampler.proj_in.in_features
    problems = []
    facial_width = facial.visual_projection.proj_out.out_features
    if facial_width != width or facial.fuse_module.layer_norm.normalized_shape[0] != width:
        problems.append(f"FacialEncoder outputs {facial_width} wide, image_proj {width}")
    if facial.visual_projection.proj_in.in_features != clip_width:
        problems.append(f"FacialEncoder reads {facial.visual_projection.proj_in.in_features}-wide CLIP states, "
                        f"image_proj {clip_width}-wide")
    for i, layer in ip.items():
        if tuple(layer["to_k_ip.weight"].shape) != (hidden[i], width):
            problems.append(f"processor {i}: to_k_ip is {tuple(layer['to_k_ip.weight'].shape)}, expected "
                            f"{(hidden[i], width)}")
    if problems:
        raise ValueError(f"{name}: its parts do not fit together ({'; '.join(problems[:3])}). {WHERE}")
    adapter = AdapterLayers({i: IPLayer(width, hidden[i]) for i in ip})
    adapter.load_state_dict({f"layers.{i}.{k}": v for i, layer in ip.items() for k, v in layer.items()}, strict=True)
    rank = int(lora[0]["to_q_lora.down.weight"].shape[0])
    variant = VARIANTS[len(hidden)]
    logger.info("IDFusion: ConsistentID %s weights %s (C %d, CLIP %d, LoRA rank %d)", variant, name, width,
                clip_width, rank)
    return ConsistentIDWeights(name, digest, variant, _patcher(EncoderModules(image_proj, facial)), _patcher(adapter),
                               {i: {k: v.detach().to("cpu") for k, v in d.items()} for i, d in lora.items()},
                               hidden, width, clip_width, rank)


def _patcher(module: nn.Module):
    """The module in fp16 where the device runs it, in the host's patcher (as its loaders wrap theirs)."""
    import comfy.model_management as mm
    from ..host_patcher import wrap
    dtype = torch.float16 if mm.should_use_fp16(mm.get_torch_device()) else torch.float32
    return wrap(module.to(dtype).requires_grad_(False))


def load(path: str) -> ConsistentIDWeights:
    name = os.path.basename(path)
    return from_groups(group(read_file(path), name), name, file_digest(path))
