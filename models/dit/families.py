"""The DiT families and what differs between them: their blocks, and where the host puts a
reference image's tokens.

Every family's joint attention runs over ``[text | image | reference images…]`` tokens and
calls the same hooks (see ``host``), so one engine serves all of them; this module is the
only one that knows the families' classes and fields. Modules are always taken from the
model being run, never kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BlockKey = tuple[str, int, int]

OFFSET = "offset"
INDEX = "index"
INDEX_TIMESTEP_ZERO = "index_timestep_zero"
NEGATIVE_INDEX = "negative_index"


@dataclass(frozen=True)
class Family:
    """name: ComfyUI's ``image_model``; label: how the user knows it; native_references: it takes
    ReferenceLatent references (Kontext, Flux.2, Qwen-Image-Edit; Flux.1-dev's class accepts them too)."""

    name: str
    label: str
    native_references: bool


FAMILIES = {
    "flux": Family("flux", "Flux.1 (dev, schnell, Kontext)", True),
    "flux2": Family("flux2", "Flux.2 (dev, Klein)", True),
    "chroma": Family("chroma", "Chroma", False),
    "qwen_image": Family("qwen_image", "Qwen-Image (and Edit)", True),
}
SUPPORTED = ", ".join(f.label for f in FAMILIES.values())


def family_of(base_model) -> Family | None:
    """The family of a ComfyUI ``BaseModel`` (a MODEL's ``.model``), None for any other model."""
    config = getattr(base_model, "model_config", None)
    return FAMILIES.get(getattr(config, "unet_config", {}).get("image_model"))


def require_family(model_patcher, node: str) -> Family:
    family = family_of(getattr(model_patcher, "model", None))
    if family is None:
        kind = type(getattr(model_patcher, "model", model_patcher)).__name__
        raise ValueError(f"{node}: 'model' is a {kind} model; the DiT nodes patch {SUPPORTED}. For SD1.5/SDXL use "
                         f"'IDFusion Reference Attention' or 'IDFusion Fused KV'")
    return family


def dit_blocks(diffusion_model, family: Family) -> tuple[BlockKey, ...]:
    """Every joint-attention block, keyed ``(block_type, block_index, 0)`` as the hooks name them."""
    if family.name == "qwen_image":
        return tuple(("double", i, 0) for i in range(len(diffusion_model.transformer_blocks)))
    skip_double = set(getattr(diffusion_model, "skip_mmdit", ()) or ())
    skip_single = set(getattr(diffusion_model, "skip_dit", ()) or ())
    return (tuple(("double", i, 0) for i in range(len(diffusion_model.double_blocks)) if i not in skip_double)
            + tuple(("single", i, 0) for i in range(len(diffusion_model.single_blocks)) if i not in skip_single))


def reference_method(diffusion_model, family: Family) -> tuple[str, float]:
    """The family's default way of placing references and its index step (FluxKVCache and
    similar object patches are seen, since the modules are the running model's)."""
    params = getattr(diffusion_model, "params", None)
    if family.name in ("flux", "flux2"):
        return params.default_ref_method, float(params.ref_index_scale)
    if family.name == "qwen_image":
        return diffusion_model.default_ref_method, 1.0
    return OFFSET, 1.0


def reference_offsets(method: str, sizes: list[tuple[int, int]], index_scale: float) -> list[tuple[float, int, int]]:
    """``(index, h_offset, w_offset)`` of each reference of latent size ``(h, w)``, as the host's
    Flux and Qwen-Image forwards place ``ref_latents`` (methods other than these place like 'offset')."""
    out, h, w, index = [], 0, 0, 0.0
    for rh, rw in sizes:
        if method in (INDEX, INDEX_TIMESTEP_ZERO):
            index += index_scale
            out.append((index, 0, 0))
        elif method == NEGATIVE_INDEX:
            index -= index_scale
            out.append((index, 0, 0))
        else:
            h_offset = w_offset = 0
            if rh + h > rw + w:
                w_offset = w
            else:
                h_offset = h
            h, w = max(h, rh + h_offset), max(w, rw + w_offset)
            out.append((1.0, h_offset, w_offset))
    return out


def reference_ids(diffusion_model, family: Family, latent: torch.Tensor, index: float, h_offset: int,
                  w_offset: int) -> torch.Tensor:
    """Position ids ``[1, R, axes]`` of one reference latent ``[1, C, (T,) h, w]`` at its place, from
    the host's own ``process_img`` (Chroma builds Flux's ids without that method: Flux's is used)."""
    if family.name == "qwen_image":
        return diffusion_model.process_img(latent, index=index, h_offset=h_offset, w_offset=w_offset)[1]
    if family.name == "chroma":
        from comfy.ldm.flux.model import Flux
        return Flux.process_img(diffusion_model, latent, index=index, h_offset=h_offset, w_offset=w_offset)[1]
    return diffusion_model.process_img(latent, index=index, h_offset=h_offset, w_offset=w_offset)[1]


def latent_size(latent: torch.Tensor) -> tuple[int, int]:
    return int(latent.shape[-2]), int(latent.shape[-1])
