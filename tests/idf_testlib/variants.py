"""Weight files that differ from another in one tensor, for the feature cache's weights key: written
into the fixture cache at test time (never committed), each once per host.

- ``checkpoint_variant``: the full-size random SD1.5 checkpoint with one UNet tensor changed, made
  by copying the file and rewriting that tensor's bytes in place (seconds, not a re-save of 2 GB);
- ``lora_pair``: two LoRAs in the real file layout that differ in one value of one tensor;
- ``flashface_pair``: the small FlashFace checkpoint under one file name in two subfolders, the
  second with one value of one ReferenceNet tensor changed.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .flashface_fixtures import flashface_dir, write_tiny_checkpoint_for_sd15_clip
from .models import sd15_checkpoint
from .paths import CACHE

#: Custom Diffusion fine-tunes only the cross-attention keys/values: a tensor like these.
CROSS_ATTENTION_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
LORA_TARGET = "input_blocks_1_1_transformer_blocks_0_attn2_to_k"
NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32}


def tensor_span(path: Path, key: str) -> tuple[int, int, str]:
    """(byte offset in the file, byte length, safetensors dtype) of one tensor of a .safetensors file."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    start, end = header[key]["data_offsets"]
    return 8 + size + start, end - start, header[key]["dtype"]


def _atomic_copy(src: Path, dst: Path, change) -> Path:
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    change(tmp)
    os.replace(tmp, dst)
    return dst


def checkpoint_variant(key: str = CROSS_ATTENTION_KEY) -> Path:
    """The SD1.5 fixture with tensor ``key`` scaled by -2 (its name says which tensor)."""
    base = sd15_checkpoint()
    dst = base.with_name(f"{base.stem}-{key.removeprefix('model.diffusion_model.').replace('.', '-')}-x-2.safetensors")
    if dst.is_file():
        return dst

    def scale(path: Path) -> None:
        offset, length, dtype = tensor_span(path, key)
        with open(path, "r+b") as f:
            f.seek(offset)
            values = np.frombuffer(f.read(length), dtype=NUMPY_DTYPES[dtype]) * -2
            f.seek(offset)
            f.write(values.astype(NUMPY_DTYPES[dtype]).tobytes())
    return _atomic_copy(base, dst, scale)


def loras_dir() -> Path:
    return CACHE / "models" / "loras"


def lora_pair(rank: int = 4, index: int = 1) -> tuple[str, str]:
    """Two LoRA file names (in models/loras): the second's lora_up differs at ``index`` (by +4),
    an element a sparse sample of the tensor would skip."""
    names = ("idfusion-test-lora-a.safetensors", "idfusion-test-lora-b.safetensors")
    folder = loras_dir()
    if all((folder / n).is_file() for n in names):
        return names
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(11)
    name = f"lora_unet_{LORA_TARGET}"
    sd = {f"{name}.lora_up.weight": torch.randn(320, rank, generator=gen) * 0.5,
          f"{name}.lora_down.weight": torch.randn(rank, 768, generator=gen) * 0.5,
          f"{name}.alpha": torch.tensor(float(rank))}
    other = {k: v.clone() for k, v in sd.items()}
    other[f"{name}.lora_up.weight"].view(-1)[index] += 4.0
    for file, tensors in zip(names, (sd, other)):
        tmp = folder / f"{file}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / file)
    return names


def flashface_pair() -> tuple[str, str]:
    """Two FlashFace files with the same base name in two subfolders of models/flashface (as the
    node lists them); the second's first ReferenceNet attention key weight differs in one value."""
    names = ("idfusion-a/flashface.safetensors", "idfusion-b/flashface.safetensors")
    if all((flashface_dir() / n).is_file() for n in names):
        return names
    source = write_tiny_checkpoint_for_sd15_clip()
    sd = load_file(str(source))
    key = next(k for k in sorted(sd) if k.startswith("ref_encoder.") and k.endswith("self_attn.k.weight"))
    other = {k: v.clone() for k, v in sd.items()}
    other[key].view(-1)[5] += 4.0
    for name, tensors in zip(names, (sd, other)):
        path = flashface_dir() / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    return names
