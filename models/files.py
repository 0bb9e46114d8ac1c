"""Reading weight files safely, and saying what is wrong with one that cannot be read.

Only two ways in: safetensors, or ``torch.load(weights_only=True)`` (memory-mapped when the
file is a zip checkpoint). A file that fails is either *damaged* (empty, truncated, corrupt:
download or copy it again) or *refused* (a pickle holding objects other than tensors, which
only an unsafe load could build). The messages say which; the caller adds which node and input
read the file and where to get it.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)


class WeightFileError(ValueError):
    """A weight file that cannot be used; the message names the file and the reason."""


def reason(error: BaseException) -> str:
    """The first sentence of a reader's error, e.g. "PytorchStreamReader failed reading zip archive:
    failed finding central directory"."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = text.split(". This is an internal")[0].rstrip(".")
    return (text[:160] or type(error).__name__).strip()


def damaged(path: Path, reason: str) -> WeightFileError:
    return WeightFileError(f"{path.name} is damaged: {reason}; the file is truncated or corrupt, "
                           f"download (or copy) it again")


def load_pickle(path: Path) -> object:
    """``torch.load(weights_only=True)``: the object, or WeightFileError (damaged or refused)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise damaged(path, "it is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise WeightFileError(f"{path.name} holds pickled objects other than tensors; loading them is unsafe "
                                  f"and refused: use a plain state dict or a .safetensors file") from error
        raise damaged(path, f"it cannot be read as a checkpoint ({reason(error)})") from error
    except (EOFError, RuntimeError, UnicodeDecodeError, ValueError, OSError) as error:
        raise damaged(path, f"it cannot be read as a checkpoint ({reason(error)})") from error


def open_safetensors(path: Path):
    """``safetensors.safe_open`` of a file, or WeightFileError when it is not a whole .safetensors file."""
    from safetensors import safe_open
    path = Path(path)
    if path.stat().st_size == 0:
        raise damaged(path, "it is empty (0 bytes)")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:           # SafetensorError and OSError: both mean the file is not whole
        raise damaged(path, f"it is not a complete .safetensors file ({reason(error)})") from error


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a small weight file (.safetensors or a pickled state dict; a top-level
    ``state_dict``/``params`` entry is unwrapped). WeightFileError when it cannot be used."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        handle = open_safetensors(path)
        try:
            return {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:
            raise damaged(path, f"a tensor cannot be read ({reason(error)})") from error
    obj = load_pickle(path)
    for wrapper in ("state_dict", "params", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightFileError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
