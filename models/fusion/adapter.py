"""Trained fused-KV adapters: per-block Linear_kf / Linear_vf from a ``.safetensors`` file.

Key layout (one pair per patched transformer block; the block key as ComfyUI's attention
patches name it, see README):

    <input|middle|output>.<number>.<index>.to_k_face.weight   [inner_dim, hidden_dim]
    <input|middle|output>.<number>.<index>.to_v_face.weight   [inner_dim, hidden_dim]
    (optional) ….to_k_face.bias, ….to_v_face.bias             [inner_dim]

``hidden_dim`` is the block's hidden width (the reference hidden state h_f), ``inner_dim``
the width of its cross-attention keys (``attn2.to_k`` output). SD1.5: 320/640/1280 both.
"""
from __future__ import annotations

import os

import torch


def adapter_key(block, name: str) -> str:
    return f"{block[0]}.{block[1]}.{block[2]}.{name}"


class AdapterLayers(torch.nn.Module):
    """ModuleDict of Linear layers named ``<block>_<number>_<index>_<k|v>``."""

    def __init__(self, layers: torch.nn.ModuleDict):
        super().__init__()
        self.layers = layers


def load_adapter(path: str, dims: dict, base_model) -> tuple[dict, object]:
    """({block: (Linear_kf, Linear_vf)}, ModelPatcher) for the blocks in ``dims``
    (block → (hidden_dim, inner_dim)). Raises ValueError naming the file and its missing or
    misshapen keys, or saying it is damaged."""
    import comfy.model_management as mm
    import comfy.ops

    from ..files import open_safetensors
    from ..host_patcher import wrap

    name = os.path.basename(path)
    with open_safetensors(path) as f:
        keys = set(f.keys())
        missing = [adapter_key(b, f"to_{kv}_face.weight") for b in dims for kv in "kv"
                   if adapter_key(b, f"to_{kv}_face.weight") not in keys]
        if missing:
            found = sorted(keys)[:6]
            raise ValueError(f"{name} lacks {len(missing)} key(s) for the chosen blocks, e.g. {missing[:4]}; found "
                             f"{found}. Expected '<block>.<number>.<index>.to_k_face.weight' and "
                             f"'….to_v_face.weight' per block (see README), or choose blocks the adapter covers")
        tensors = {k: f.get_tensor(k) for k in keys}
    dtype = base_model.get_dtype()
    operations = comfy.ops.pick_operations(dtype, base_model.manual_cast_dtype)
    offload = mm.unet_offload_device()
    layers, pairs, sd = torch.nn.ModuleDict(), {}, {}
    for block, (hidden, inner) in dims.items():
        pair = []
        for kv in "kv":
            weight = tensors[adapter_key(block, f"to_{kv}_face.weight")]
            if tuple(weight.shape) != (inner, hidden):
                raise ValueError(f"{name}: key {adapter_key(block, f'to_{kv}_face.weight')} has shape "
                                 f"{tuple(weight.shape)}, expected {(inner, hidden)} for this model; use an adapter "
                                 f"trained for this model family")
            bias = tensors.get(adapter_key(block, f"to_{kv}_face.bias"))
            name = f"{block[0]}_{block[1]}_{block[2]}_{kv}"
            layers[name] = operations.Linear(hidden, inner, bias=bias is not None, dtype=dtype, device=offload)
            sd[f"layers.{name}.weight"] = weight.to(dtype)
            if bias is not None:
                sd[f"layers.{name}.bias"] = bias.to(dtype)
            pair.append(layers[name])
        pairs[block] = tuple(pair)
    holder = AdapterLayers(layers).requires_grad_(False)
    return pairs, wrap(holder, sd, name)
