"""FlashFace checkpoints in ComfyUI's UNet key names.

Reads the official release (``flashface.ckpt``, the state dict of ali-vilab/FlashFace's
``RefStableUNet``, or a ``.safetensors`` with the same keys) or the compact file written by
:func:`convert`, and returns a :class:`FlashFaceWeights`:

- ``unet``: the fine-tuned main UNet in ComfyUI ``diffusion_model`` names (no
  ``model.diffusion_model.`` prefix); ``input_blocks.0.0.weight`` is ``[320, 5, 3, 3]``
  (latent + face position mask);
- ``reference``: the reference network's encoder and decoder (``input_blocks.*``,
  ``output_blocks.*``; conv_in 4 channels). It shares the main UNet's time embedding,
  middle block and head;
- ``extra_attention``: the extra self-attention A' of every middle/decoder transformer
  block, keyed like ComfyUI's attention patches: ``("middle", 0, index)`` or
  ``("output", block, index)`` -> ``{"to_q.weight", "to_k.weight", "to_v.weight",
  "to_out.0.weight", "to_out.0.bias"}``.

Official names map to ComfyUI's mechanically: ``time_embedding``/``encoder``/``middle``/
``decoder``/``head`` -> ``time_embed``/``input_blocks``/``middle_block``/``output_blocks``/
``out`` with the same block and sub-module indices; residual blocks ``layer1.{0,2}``,
``embedding.1``, ``layer2.{0,3}``, ``shortcut`` -> ``in_layers.{0,2}``, ``emb_layers.1``,
``out_layers.{0,3}``, ``skip_connection``; attention stacks ``norm1``/``conv1``/``conv2``/
``blocks.N`` -> ``norm``/``proj_in``/``proj_out``/``transformer_blocks.N``, inside them
``self_attn``/``cross_attn`` -> ``attn1``/``attn2``, ``q``/``k``/``v``/``o`` ->
``to_q``/``to_k``/``to_v``/``to_out.0``, ``ffn.0.proj``/``ffn.2`` -> ``ff.net.0.proj``/
``ff.net.2``; a bare conv in the encoder is conv_in (index 0) or a downsample
(``encoder.K.weight`` -> ``input_blocks.K.0.op.weight``); ``decoder.I.J.1.*`` (the conv of a
``Sequential(Upsample, Conv2d)``) -> ``output_blocks.I.J.conv.*``;
``...blocks.N.self_attn.self_attn_first.*`` -> ``extra_attention``. The ``ori_*`` copies of
the main UNet are checked equal and dropped; ``ref_middle`` is unused and never read.

Converted layout (fp16 safetensors, metadata ``{"format": "idfusion-flashface",
"version": "1"}``): ``unet.<name>``, ``reference.<name>`` and
``extra_attention.<block>.<number>.<index>.<param>``
(e.g. ``extra_attention.output.3.0.to_q.weight``).

Plain torch and safetensors only (no ComfyUI), so ``tools/convert_flashface.py`` can load
this file by path.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..files import WeightFileError, damaged, load_pickle, reason

log = logging.getLogger("IDFusion")

FORMAT = "idfusion-flashface"
FORMAT_VERSION = "1"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
SAFETENSORS_SUFFIXES = (".safetensors",)
#: Where the file goes, and where to get it: the end of every "not a FlashFace file" error.
WHAT_TO_DO = ("Put the official flashface.ckpt from the FlashFace release "
              "(https://huggingface.co/shilongz/FlashFace-SD1.5) or a file made by "
              "tools/convert_flashface.py into models/flashface.")
ATTENTION_PARAMS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")

BlockKey = tuple[str, int, int]
Progress = Callable[[int, int], None]
#: A mapped name: ("unet", comfy_name) or ("extra", block_key, attention_param).
Target = tuple[str, str] | tuple[str, BlockKey, str]


@dataclass
class FlashFaceWeights:
    """FlashFace's weights in ComfyUI names (see the module docstring).

    unet:            {diffusion_model key: tensor}, the main UNet, conv_in [C, 5, 3, 3].
    reference:       {input_blocks.* / output_blocks.* key: tensor}, conv_in [C, 4, 3, 3].
    extra_attention: {(block, number, index): {ATTENTION_PARAMS: tensor}}.
    source:          the file name (for messages).
    """

    unet: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    extra_attention: dict[BlockKey, dict[str, torch.Tensor]]
    source: str


# --- reading files ------------------------------------------------------------------------

class LazySafetensors(Mapping):
    """The tensors of a .safetensors file, each read (memory-mapped) when first asked for."""

    def __init__(self, path: Path):
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)
        self.metadata: dict[str, str] = self._file.metadata() or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The tensors of a checkpoint, without unsafe unpickling.

    ``.ckpt``/``.pt``/``.pth``: ``torch.load(weights_only=True)``, memory-mapped when the file
    is a zip checkpoint; a top-level ``state_dict`` or ``model`` entry is unwrapped; entries
    that are not tensors are left out. ``.safetensors``: a lazy read-only mapping over
    ``safe_open``. Raises FileNotFoundError or ValueError with what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FlashFace weights not found: {path}. {WHAT_TO_DO}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise ValueError(f"{path.name}: unsupported file type '{suffix}'; FlashFace weights are read from "
                     f"{', '.join(PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES)} files. {WHAT_TO_DO}")


def _guided(error: WeightFileError) -> WeightFileError:
    """A weight-file error (models/files.py) with where FlashFace's weights come from."""
    return WeightFileError(f"{error}. {WHAT_TO_DO}")


def _read_safetensors(path: Path) -> LazySafetensors:
    if path.stat().st_size == 0:
        raise _guided(damaged(path, "it is empty (0 bytes)"))
    try:
        return LazySafetensors(path)
    except (SafetensorError, OSError) as e:
        raise _guided(damaged(path, f"it is not a complete .safetensors file ({reason(e)})")) from e


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: a damaged (empty, truncated, corrupt) or refused (pickled
    objects other than tensors) file says which."""
    if path.stat().st_size and not zipfile.is_zipfile(path):
        log.warning("%s is not a zip checkpoint: it is read into memory whole", path.name)
    try:
        obj = load_pickle(path)
    except WeightFileError as e:
        raise _guided(e) from e
    return _tensors_of(obj, path.name)


def _tensors_of(obj: object, name: str) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{name}: holds a {type(obj).__name__}, not a state dict. {WHAT_TO_DO}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors file ({} for other files)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    return _read_safetensors(path).metadata


# --- layouts ------------------------------------------------------------------------------

OFFICIAL_MARKERS = {
    "encoder.*": lambda k: k.startswith("encoder."),
    "middle.*": lambda k: k.startswith("middle."),
    "decoder.*": lambda k: k.startswith("decoder."),
    "ref_encoder.*": lambda k: k.startswith("ref_encoder."),
    "ref_decoder.*": lambda k: k.startswith("ref_decoder."),
    "decoder.*.1.blocks.0.self_attn.self_attn_first.*":
        lambda k: k.startswith("decoder.") and ".self_attn.self_attn_first." in k,
}
CONVERTED_MARKERS = {f"{p}.*": (lambda k, p=p: k.startswith(p + ".")) for p in ("unet", "reference", "extra_attention")}
KNOWN_OTHER_LAYOUTS = (
    ("model.diffusion_model.", "a Stable Diffusion checkpoint (it belongs in models/checkpoints)"),
    ("lora_unet_", "a LoRA (it belongs in models/loras)"),
    ("input_blocks.", "a bare UNet in ComfyUI names (models/diffusion_models)"),
)


def detect_layout(keys: Iterable[str], source: str = "checkpoint") -> str:
    """"official" or "converted"; a ValueError naming expected and found keys otherwise."""
    keys = list(keys)
    found = {name: False for name in (*OFFICIAL_MARKERS, *CONVERTED_MARKERS)}
    for key in keys:
        for name, test in (*OFFICIAL_MARKERS.items(), *CONVERTED_MARKERS.items()):
            found[name] = found[name] or test(key)
    if all(found[name] for name in OFFICIAL_MARKERS):
        return "official"
    if all(found[name] for name in CONVERTED_MARKERS):
        return "converted"
    raise ValueError(_not_flashface_message(keys, found, source))


def require_layout(keys: Iterable[str], layout: str, source: str = "checkpoint") -> None:
    """Raise ValueError unless ``keys`` are in ``layout`` ("official" or "converted")."""
    found = detect_layout(keys, source)
    if found != layout:
        raise ValueError(f"{source}: holds the {found} FlashFace layout where the {layout} one was expected; "
                         f"load_flashface() reads either")


def _not_flashface_message(keys: list[str], found: dict[str, bool], source: str) -> str:
    official_missing = [name for name in OFFICIAL_MARKERS if not found[name]]
    hint = next((f" It looks like {what}." for prefix, what in KNOWN_OTHER_LAYOUTS
                 if any(k.startswith(prefix) for k in keys)), "")
    seen = "no tensors" if not keys else f"{len(keys)} tensors with key prefixes {', '.join(key_prefixes(keys))}"
    return (f"{source} is not a FlashFace checkpoint: expected the official layout "
            f"({', '.join(OFFICIAL_MARKERS)}; missing here: {', '.join(official_missing)}) or the converted "
            f"layout ({', '.join(CONVERTED_MARKERS)}), found {seen}.{hint} {WHAT_TO_DO}")


def key_prefixes(keys: Iterable[str], limit: int = 6) -> list[str]:
    """The first ``limit`` distinct two-part key prefixes, as 'a.b.*'."""
    prefixes = []
    for key in keys:
        prefix = ".".join(key.split(".")[:2]) + ".*"
        if prefix not in prefixes:
            prefixes.append(prefix)
            if len(prefixes) == limit:
                break
    return prefixes


# --- official names -> ComfyUI names -----------------------------------------------------

RESBLOCK_NAMES = {"layer1.0": "in_layers.0", "layer1.2": "in_layers.2", "embedding.1": "emb_layers.1",
                  "layer2.0": "out_layers.0", "layer2.3": "out_layers.3", "shortcut": "skip_connection"}
TRANSFORMER_NAMES = {"norm1": "norm", "conv1": "proj_in", "conv2": "proj_out"}
PROJECTION_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
ATTENTION_BLOCK_NAMES = {"norm1": "norm1", "norm2": "norm2", "norm3": "norm3",
                         "ffn.0.proj": "ff.net.0.proj", "ffn.2": "ff.net.2",
                         **{f"self_attn.{k}": f"attn1.{v}" for k, v in PROJECTION_NAMES.items()},
                         **{f"cross_attn.{k}": f"attn2.{v}" for k, v in PROJECTION_NAMES.items()}}
SEQUENTIAL_NAMES = {"0": "0", "2": "2"}
PARAMS = ("weight", "bias")
EXTRA = ".self_attn.self_attn_first."


def _rename(path: str, table: dict[str, str]) -> str | None:
    """Replace the longest table key that is a whole-token prefix of ``path`` followed by a
    parameter name ('layer1.0.weight' -> 'in_layers.0.weight'); None if none fits."""
    for old in sorted(table, key=len, reverse=True):
        if path.startswith(old + ".") and path[len(old) + 1:] in PARAMS:
            return table[old] + path[len(old):]
    return None


def _index(token: str) -> int | None:
    return int(token) if token.isdigit() else None


def map_official_key(section: str, path: str) -> Target | None:
    """Where one official parameter goes: section is 'time_embedding', 'head', 'encoder',
    'middle' or 'decoder' (without ref_/ori_), path the rest of the key. None if unknown."""
    if section == "time_embedding":
        name = _rename(path, SEQUENTIAL_NAMES)
        return ("unet", f"time_embed.{name}") if name else None
    if section == "head":
        name = _rename(path, SEQUENTIAL_NAMES)
        return ("unet", f"out.{name}") if name else None
    if section == "encoder":
        return _map_encoder(path)
    if section == "middle":
        first, _, inner = path.partition(".")
        j = _index(first)
        return None if j is None else _map_submodule(f"middle_block.{j}", inner, ("middle", 0))
    if section == "decoder":
        return _map_decoder(path)
    return None


def _map_encoder(path: str) -> Target | None:
    first, _, rest = path.partition(".")
    k = _index(first)
    if k is None:
        return None
    if rest in PARAMS:  # a bare conv: conv_in at 0, a strided downsample conv elsewhere
        return ("unet", f"input_blocks.0.0.{rest}" if k == 0 else f"input_blocks.{k}.0.op.{rest}")
    second, _, inner = rest.partition(".")
    j = _index(second)
    return None if j is None else _map_submodule(f"input_blocks.{k}.{j}", inner, ("input", k))


def _map_decoder(path: str) -> Target | None:
    parts = path.split(".", 2)
    if len(parts) < 3 or _index(parts[0]) is None or _index(parts[1]) is None:
        return None
    i, j, inner = int(parts[0]), int(parts[1]), parts[2]
    if inner in ("1.weight", "1.bias"):  # Sequential(Upsample, Conv2d): the conv is its item 1
        return ("unet", f"output_blocks.{i}.{j}.conv.{inner[2:]}")
    return _map_submodule(f"output_blocks.{i}.{j}", inner, ("output", i))


def _map_submodule(prefix: str, inner: str, block: tuple[str, int]) -> Target | None:
    """A residual block or an attention stack at ``prefix`` (e.g. 'output_blocks.5.1')."""
    name = _rename(inner, RESBLOCK_NAMES) or _rename(inner, TRANSFORMER_NAMES)
    if name:
        return ("unet", f"{prefix}.{name}")
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", inner)
    if not match:
        return None
    n, rest = int(match.group(1)), match.group(2)
    if rest.startswith(EXTRA[1:]):
        param = _rename(rest[len(EXTRA) - 1:], PROJECTION_NAMES)
        return ("extra", (block[0], block[1], n), param) if param else None
    name = _rename(rest, ATTENTION_BLOCK_NAMES)
    return ("unet", f"{prefix}.transformer_blocks.{n}.{name}") if name else None


def official_to_comfy(sd: Mapping[str, torch.Tensor], source: str = "checkpoint",
                      progress: Progress | None = None) -> FlashFaceWeights:
    """Map an official FlashFace state dict to ComfyUI names (see the module docstring).

    Reads every tensor once: ``ori_*`` copies are compared with the main UNet (torch.equal)
    and dropped, ``ref_middle.*`` is never read. ``progress(done, total)`` is called as keys
    are handled. Raises ValueError for a file that is not FlashFace, unknown keys, or ori_*
    copies that differ from the main weights.
    """
    keys = list(sd.keys())
    require_layout(keys, "official", source)
    ticker = _Ticker(progress, len(keys))
    weights = FlashFaceWeights({}, {}, {}, source)
    copies, unknown, unused = [], [], 0
    for key in keys:
        group, _, rest = key.partition(".")
        if group.startswith("ori_"):
            copies.append(key)
            continue
        if group == "ref_middle":
            unused += 1
        elif not _place(weights, group, rest, sd, key):
            unknown.append(key)
        ticker.step()
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} keys of the FlashFace checkpoint have no ComfyUI "
                         f"counterpart, e.g. {', '.join(unknown[:5])}. Is it a FlashFace SD1.5 checkpoint?")
    log.debug("%s: %d ref_middle.* tensors dropped (the reference network runs without its middle block)",
              source, unused)
    _check_copies(sd, copies, weights, source, ticker)
    validate(weights)
    _log_summary(weights, f"official layout, {len(copies)} ori_* copies checked and dropped")
    return weights


def _place(weights: FlashFaceWeights, group: str, rest: str, sd: Mapping[str, torch.Tensor], key: str) -> bool:
    """Put ``sd[key]`` where it belongs; False if the key is unknown."""
    reference = group in ("ref_encoder", "ref_decoder")
    target = map_official_key(group[4:] if reference else group, rest)
    if target is None or (reference and target[0] != "unet"):
        return False
    if reference:
        weights.reference[target[1]] = sd[key]
    elif target[0] == "unet":
        weights.unet[target[1]] = sd[key]
    else:
        weights.extra_attention.setdefault(target[1], {})[target[2]] = sd[key]
    return True


def _check_copies(sd: Mapping[str, torch.Tensor], copies: list[str], weights: FlashFaceWeights,
                  source: str, ticker: "_Ticker") -> None:
    """Each ori_<part>.* must equal <part>.* (the official model aliases them)."""
    differing = []
    for key in copies:
        plain = key[len("ori_"):]
        target = map_official_key(*plain.split(".", 1))
        mapped = None
        if target is not None:
            mapped = weights.unet.get(target[1]) if target[0] == "unet" else \
                weights.extra_attention.get(target[1], {}).get(target[2])
        copy = sd[key]
        if mapped is None or mapped.shape != copy.shape or not torch.equal(mapped, copy):
            differing.append(f"{key} vs {plain}")
        ticker.step()
    if differing:
        raise ValueError(f"{source}: the ori_* tensors should be copies of the main UNet, but {len(differing)} "
                         f"differ or have no counterpart: {'; '.join(differing[:4])}. The file may be damaged: "
                         f"download it again. {WHAT_TO_DO}")


# --- the converted layout ----------------------------------------------------------------

def converted_key(part: str, name: str | BlockKey, param: str | None = None) -> str:
    """The key in the converted file: ('unet', n) -> 'unet.n';
    ('extra_attention', ('output', 3, 0), 'to_q.weight') -> 'extra_attention.output.3.0.to_q.weight'."""
    if part == "extra_attention":
        block, number, index = name
        return f"extra_attention.{block}.{number}.{index}.{param}"
    return f"{part}.{name}"


def converted_to_comfy(sd: Mapping[str, torch.Tensor], source: str = "checkpoint",
                       progress: Progress | None = None) -> FlashFaceWeights:
    """Read the converted layout (``unet.*``, ``reference.*``, ``extra_attention.*``)."""
    keys = list(sd.keys())
    require_layout(keys, "converted", source)
    ticker = _Ticker(progress, len(keys))
    weights = FlashFaceWeights({}, {}, {}, source)
    unknown = []
    for key in keys:
        part, _, name = key.partition(".")
        if part == "unet":
            weights.unet[name] = sd[key]
        elif part == "reference":
            weights.reference[name] = sd[key]
        elif part == "extra_attention" and (block := _parse_block(name)):
            weights.extra_attention.setdefault(block[0], {})[block[1]] = sd[key]
        else:
            unknown.append(key)
        ticker.step()
    if unknown:
        raise ValueError(f"{source}: unknown keys in a converted FlashFace file: {', '.join(unknown[:5])}. "
                         f"Convert the official checkpoint again with tools/convert_flashface.py.")
    validate(weights)
    _log_summary(weights, "converted layout")
    return weights


def _parse_block(name: str) -> tuple[BlockKey, str] | None:
    match = re.fullmatch(r"(input|middle|output)\.(\d+)\.(\d+)\.(.+)", name)
    if not match:
        return None
    return (match.group(1), int(match.group(2)), int(match.group(3))), match.group(4)


# --- checks -------------------------------------------------------------------------------

TRANSFORMER_Q = re.compile(r"(middle_block|output_blocks\.(\d+))\.(\d+)\.transformer_blocks\.(\d+)\.attn1\.to_q\.weight")


def transformer_attn1(unet: Mapping[str, torch.Tensor]) -> dict[BlockKey, str]:
    """{block key: 'prefix.attn1.'} for every middle/decoder transformer block of a UNet."""
    found = {}
    for key in unet:
        match = TRANSFORMER_Q.fullmatch(key)
        if match:
            block = ("middle", 0) if match.group(1) == "middle_block" else ("output", int(match.group(2)))
            found[(*block, int(match.group(4)))] = key[:-len("to_q.weight")]
    return found


def validate(weights: FlashFaceWeights) -> None:
    """The three parts fit together: a 5-channel main UNet, a 4-channel reference network with
    the same encoder/decoder keys, and one complete extra attention per middle/decoder
    transformer block with the shapes of its self-attention. Raises ValueError."""
    src = weights.source
    _check_conv_in(weights.unet, 5, f"{src}: the main UNet", "latent + face position mask")
    _check_conv_in(weights.reference, 4, f"{src}: the reference network", "latent")
    expected = {k for k in weights.unet if k.startswith(("input_blocks.", "output_blocks."))}
    if set(weights.reference) != expected:
        missing, extra = sorted(expected - set(weights.reference)), sorted(set(weights.reference) - expected)
        raise ValueError(f"{src}: the reference network's keys do not match the main UNet's encoder/decoder "
                         f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for name, tensor in weights.reference.items():
        if name != "input_blocks.0.0.weight" and tensor.shape != weights.unet[name].shape:
            raise ValueError(f"{src}: reference {name} has shape {tuple(tensor.shape)}, "
                             f"the main UNet's {tuple(weights.unet[name].shape)}")
    _check_extra_attention(weights)


def _check_conv_in(sd: Mapping[str, torch.Tensor], channels: int, what: str, meaning: str) -> None:
    conv = sd.get("input_blocks.0.0.weight")
    if conv is None or conv.ndim != 4 or conv.shape[1] != channels:
        shape = None if conv is None else tuple(conv.shape)
        raise ValueError(f"{what} should take {channels} input channels ({meaning}); its conv_in "
                         f"input_blocks.0.0.weight has shape {shape}")


def _check_extra_attention(weights: FlashFaceWeights) -> None:
    attn1 = transformer_attn1(weights.unet)
    src = weights.source
    if set(weights.extra_attention) != set(attn1):
        raise ValueError(f"{src}: extra attentions for blocks {sorted(weights.extra_attention)}, but the "
                         f"middle/decoder transformer blocks are {sorted(attn1)}")
    for block, params in weights.extra_attention.items():
        if set(params) != set(ATTENTION_PARAMS):
            raise ValueError(f"{src}: the extra attention of {block} has {sorted(params)}, "
                             f"expected {list(ATTENTION_PARAMS)}")
        for param, tensor in params.items():
            own = weights.unet[attn1[block] + param]
            if tensor.shape != own.shape:
                raise ValueError(f"{src}: the extra attention {block} {param} has shape {tuple(tensor.shape)}, "
                                 f"its block's self-attention {tuple(own.shape)}")


def _log_summary(weights: FlashFaceWeights, how: str) -> None:
    log.info("FlashFace weights from %s (%s): main UNet %.0fM parameters, reference network %.0fM, "
             "%d extra attentions", weights.source, how, _millions(weights.unet.values()),
             _millions(weights.reference.values()), len(weights.extra_attention))


def _millions(tensors: Iterable[torch.Tensor]) -> float:
    return sum(math.prod(t.shape) for t in tensors) / 1e6


class _Ticker:
    """Calls ``progress(done, total)`` about a hundred times over ``total`` steps."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0
        self.every = max(1, total // 100)

    def step(self) -> None:
        self.done += 1
        if self.progress and (self.done % self.every == 0 or self.done == self.total):
            self.progress(self.done, self.total)


# --- loading and converting ----------------------------------------------------------------

def load_flashface(path: str | os.PathLike, progress: Progress | None = None) -> FlashFaceWeights:
    """Read a FlashFace file in either layout into ComfyUI names (see the module docstring)."""
    path = Path(path)
    sd = read_checkpoint(path)
    layout = detect_layout(sd.keys(), path.name)
    if layout == "official":
        return official_to_comfy(sd, path.name, progress)
    _check_format_version(read_metadata(path), path.name)
    return converted_to_comfy(sd, path.name, progress)


def _check_format_version(metadata: Mapping[str, str], source: str) -> None:
    if metadata.get("format") == FORMAT and metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{source}: converted FlashFace format version {metadata.get('version')!r}; this "
                         f"IDFusion reads version {FORMAT_VERSION}. Update IDFusion or convert the official "
                         f"checkpoint again with tools/convert_flashface.py.")


def converted_tensors(weights: FlashFaceWeights) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of the converted layout, in file order."""
    for name, tensor in weights.unet.items():
        yield converted_key("unet", name), tensor
    for name, tensor in weights.reference.items():
        yield converted_key("reference", name), tensor
    for block in sorted(weights.extra_attention):
        for param in ATTENTION_PARAMS:
            yield converted_key("extra_attention", block, param), weights.extra_attention[block][param]


def save_converted(weights: FlashFaceWeights, dst: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Write ``weights`` as an fp16 .safetensors in the converted layout, one tensor at a time
    (peak memory: one tensor), through a temporary file renamed at the end."""
    dst = Path(dst)
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "source": weights.source}
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    try:
        write_safetensors(list(converted_tensors(weights)), tmp, metadata, torch.float16, progress)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%.2f GB)", dst, dst.stat().st_size / 1e9)
    return dst


def convert(src: str | os.PathLike, dst: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Read ``src`` (either layout) and write the converted fp16 file ``dst``. ``progress`` is
    called for reading, then again from 0 for writing."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"convert: source and destination are the same file ({src})")
    return save_converted(load_flashface(src, progress), dst, progress)


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def write_safetensors(tensors: list[tuple[str, torch.Tensor]], path: Path, metadata: dict[str, str],
                      dtype: torch.dtype, progress: Progress | None = None) -> None:
    """Stream ``tensors`` (cast to ``dtype``) into a .safetensors file: 8-byte little-endian
    header size, JSON header (names, dtypes, shapes, byte offsets), then the data in order."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors:
        size = math.prod(tensor.shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    ticker = _Ticker(progress, len(tensors))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, tensor in tensors:
            data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
            f.write(data.reshape(-1).view(torch.uint8).numpy())
            ticker.step()
