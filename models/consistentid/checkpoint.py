"""ConsistentID's released files: reading them safely, checking their layout, a safetensors copy.

``ConsistentID-v1.bin`` (SD1.5) and ``ConsistentID_SDXL-v1.bin`` are pickles of three dicts:

- ``FacialEncoder``: the region encoder and the text fuse module (``modules.FacialEncoder``);
- ``image_proj`` (``image_proj_model`` in the SDXL file and the official converter): the ID
  projection (``modules.IDProjection``);
- ``adapter_modules``: per attention processor i (diffusers' ``unet.attn_processors`` order, attn1
  even, attn2 odd) ``{i}.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight`` (a LoRA without alpha,
  scale 1) and, on cross-attentions, ``{i}.to_k_ip.weight`` / ``{i}.to_v_ip.weight`` (the ID-token
  keys/values).

Read with ``torch.load(weights_only=True, mmap=True)``, or from a ``.safetensors`` whose keys are
``<group>.<key>`` (``write_safetensors`` makes one). Anything else gets an error that lists the
expected and found keys and says where the file belongs. Needs only torch and safetensors, so
``tools/convert_consistentid.py`` loads this module by its path.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from ..files import WeightFileError, damaged, load_pickle, open_safetensors, reason

FOLDER = "consistentid"
EXTENSIONS = {".bin", ".pt", ".pth", ".safetensors"}
GROUPS = ("FacialEncoder", "image_proj", "adapter_modules")
ALIASES = {"image_proj_model": "image_proj"}
LORA = tuple(f"{name}_lora.{part}.weight" for name in ("to_q", "to_k", "to_v", "to_out") for part in ("down", "up"))
IP = ("to_k_ip.weight", "to_v_ip.weight")
ADAPTER_KEY = re.compile(r"^(\d+)\.(.+)$")
#: Attention processors of the UNets the releases were trained on.
VARIANTS = {32: "SD1.5", 140: "SDXL"}
EXPECTED = ("FacialEncoder.{visual_projection.*, fuse_module.*}, image_proj.{proj.*, norm.*, perceiver_resampler.*} "
            "(or image_proj_model.*), adapter_modules.{<i>.to_q_lora.down.weight, …, <i>.to_k_ip.weight, …}")
WHERE = (f"ConsistentID files (ConsistentID-v1.bin, ConsistentID_SDXL-v1.bin, or .safetensors made by "
         f"tools/convert_consistentid.py) belong in models/{FOLDER}/")


# --- reading -----------------------------------------------------------------------------------

def read_file(path: str) -> dict:
    """The raw content: a dict (of dicts of tensors, or of tensors), read safely; a damaged or
    refused file says so (models/files.py) and where ConsistentID files belong."""
    try:
        if path.endswith(".safetensors"):
            handle = open_safetensors(Path(path))
            try:
                return {key: handle.get_tensor(key) for key in handle.keys()}
            except Exception as error:
                raise damaged(Path(path), f"a tensor cannot be read ({reason(error)})") from error
        return load_pickle(Path(path))
    except WeightFileError as error:
        raise WeightFileError(f"{error}. {WHERE}") from error


def group(raw: dict, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{group: {key: tensor}}`` from a dict of dicts or a flat ``<group>.<key>`` dict."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{name} is not a ConsistentID checkpoint: it holds {type(raw).__name__}, not a dict of "
                         f"tensors. {WHERE}")
    if all(isinstance(v, dict) for v in raw.values()):
        groups = {k: dict(v) for k, v in raw.items()}
    elif all(torch.is_tensor(v) for v in raw.values()):
        groups = {}
        for key, value in raw.items():
            head, _, tail = key.partition(".")
            groups.setdefault(head, {})[tail] = value
    else:
        raise ValueError(f"{name} is not a ConsistentID checkpoint: expected {EXPECTED}; found "
                         f"{summary(raw)}. {WHERE}")
    return normalized(groups)


def normalized(groups: dict) -> dict:
    """The groups under their SD1.5 names (``image_proj_model`` → ``image_proj``)."""
    return {ALIASES.get(k, k): v for k, v in groups.items()}


def summary(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" … (+{len(keys) - limit} more)" if len(keys) > limit else "") if keys else "nothing"


def _flat_keys(groups: dict) -> list[str]:
    return [f"{g}.{k}" for g, sd in groups.items() for k in sd]


def found(groups: dict) -> str:
    """'FacialEncoder.* (43 keys, e.g. FacialEncoder.fuse_module…), …' for an error message."""
    return ", ".join(f"{g}.* ({len(sd)} key{'s' if len(sd) != 1 else ''}, e.g. {g}.{sorted(sd)[0]})" if sd else g
                     for g, sd in sorted(groups.items()))


def looks_like(keys: list[str]) -> str | None:
    """What another kind of file this is, and its folder, from its keys (or None)."""
    joined = "\n".join(keys)
    tests = (
        (r"^model\.diffusion_model\.", "a Stable Diffusion checkpoint: it belongs in models/checkpoints/"),
        (r"^ip_adapter\.", "an IP-Adapter model: it belongs in models/ipadapter/"),
        (r"lora_unet_|lora_te|\.lora_up\.|\.lora_A\.", "a LoRA: it belongs in models/loras/"),
        (r"^vision_model\.|^visual\.", "a CLIP vision model: it belongs in models/clip_vision/"),
        (r"^cp\.resnet\.", "a BiSeNet face-parsing model: it belongs in models/facexlib/"),
        (r"^ref_(encoder|decoder)\.", "a FlashFace checkpoint: it belongs in models/flashface/"),
    )
    for pattern, what in tests:
        if re.search(pattern, joined, flags=re.MULTILINE):
            return what
    return None


def check_groups(groups: dict, name: str) -> None:
    groups = normalized(groups)
    missing = [g for g in GROUPS if g not in groups]
    extra = [g for g in groups if g not in GROUPS]
    if missing or extra:
        keys = _flat_keys(groups)
        kind = looks_like(keys)
        raise ValueError(f"{name} is not a ConsistentID checkpoint: expected {EXPECTED}; found {found(groups)}"
                         f"{' (missing ' + ', '.join(missing) + ')' if missing else ''}. "
                         f"{'This looks like ' + kind + '. ' if kind else ''}{WHERE}")


def parse_adapter(sd: dict, name: str) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, dict[str, torch.Tensor]]]:
    """(lora, ip) per processor index from the ``adapter_modules`` group, every key accounted for."""
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        match = ADAPTER_KEY.match(key)
        if match is None or match.group(2) not in LORA + IP:
            raise ValueError(f"{name}: adapter_modules.{key} is not a ConsistentID adapter key; expected "
                             f"<i>.{{to_q,to_k,to_v,to_out}}_lora.{{down,up}}.weight and <i>.to_{{k,v}}_ip.weight. "
                             f"{WHERE}")
        per.setdefault(int(match.group(1)), {})[match.group(2)] = value
    count = max(per) + 1 if per else 0
    lora, ip = {}, {}
    for i in range(count):
        found = per.get(i, {})
        wanted = set(LORA) | (set(IP) if i % 2 else set())
        if set(found) != wanted:
            raise ValueError(f"{name}: attention processor {i} in adapter_modules has {summary(found)}; expected "
                             f"{summary(wanted)} (even processors are self-attentions without to_k_ip/to_v_ip). "
                             f"{WHERE}")
        lora[i] = {k: found[k] for k in LORA}
        if i % 2:
            ip[i] = {k: found[k] for k in IP}
    if count not in VARIANTS:
        raise ValueError(f"{name}: adapter_modules covers {count} attention processors; ConsistentID's releases have "
                         f"32 (SD1.5) or 140 (SDXL). {WHERE}")
    return lora, ip


def file_digest(path: str) -> str:
    stat = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]


# --- conversion ------------------------------------------------------------------------------------

def write_safetensors(groups: dict, path: str, dtype: torch.dtype | None = None) -> int:
    """Write the groups as one ``.safetensors`` with keys ``<group>.<key>``; returns the tensor count."""
    import safetensors.torch
    flat = {f"{g}.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for g, sd in groups.items() for k, v in sd.items()}
    safetensors.torch.save_file(flat, path, metadata={"format": "pt", "content": "ConsistentID"})
    return len(flat)
