"""The one place that knows ComfyUI's UNet block keys and its patch API.

A transformer block is addressed as ComfyUI's attention patches address it:
``(block_name, number, index)`` — ``("input"|"middle"|"output", position in that list,
index of the BasicTransformerBlock inside the SpatialTransformer)``. The tables below are
what the real host's SD1.5 and SDXL UNets contain (tests check them against the host);
``block_table`` derives the table from any UNet's modules (``models/unet_layout.py``, which
the patches also use to find their block in the model being run) and checks it against them.
"""
from __future__ import annotations

import re

import comfy.patcher_extension

from ..models.unet_layout import BlockKey, transformer_blocks

SD15_BLOCKS: tuple[BlockKey, ...] = (
    *[("input", n, 0) for n in (1, 2, 4, 5, 7, 8)],
    ("middle", 0, 0),
    *[("output", n, 0) for n in range(3, 12)],
)
SDXL_BLOCKS: tuple[BlockKey, ...] = (
    *[("input", n, i) for n in (4, 5) for i in range(2)],
    *[("input", n, i) for n in (7, 8) for i in range(10)],
    *[("middle", 0, i) for i in range(10)],
    *[("output", n, i) for n in (0, 1, 2) for i in range(10)],
    *[("output", n, i) for n in (3, 4, 5) for i in range(2)],
)

#: Block selections offered by the nodes.
DECODER = "decoder (middle + output)"
ENCODER_DECODER = "encoder + decoder (input + output)"
ALL = "all (input + middle + output)"
SELECTIONS = (DECODER, ENCODER_DECODER, ALL)
_SELECTED = {DECODER: ("middle", "output"), ENCODER_DECODER: ("input", "output"), ALL: ("input", "middle", "output")}

WRAPPER_KEY = "idfusion"


def known_table(model_config) -> tuple[BlockKey, ...] | None:
    name = type(model_config).__name__
    return {"SD15": SD15_BLOCKS, "SDXL": SDXL_BLOCKS}.get(name)


def block_table(model_patcher) -> tuple[BlockKey, ...]:
    """The transformer-block keys of a MODEL; for SD1.5 and SDXL checked against the tables."""
    base = model_patcher.model
    derived = tuple(transformer_blocks(base.diffusion_model))
    expected = known_table(base.model_config)
    if expected is not None and derived != expected:
        raise RuntimeError(f"IDFusion: this {type(base.model_config).__name__} UNet's transformer blocks differ "
                           f"from the known table ({len(derived)} vs {len(expected)}); please report this")
    if not derived:
        raise ValueError("MODEL: this model has no UNet transformer blocks; IDFusion patches SD1.5/SDXL-style UNets")
    return derived


def select_blocks(table: tuple[BlockKey, ...], selection: str) -> tuple[BlockKey, ...]:
    if selection not in _SELECTED:
        raise ValueError(f"blocks: unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    names = _SELECTED[selection]
    return tuple(k for k in table if k[0] in names)


def require_unet(model_patcher, node: str) -> None:
    unet = getattr(model_patcher.model, "diffusion_model", None)
    if unet is None or not hasattr(unet, "input_blocks"):
        raise ValueError(f"{node}: MODEL is not a UNet model (SD1.5 / SDXL family); IDFusion cannot patch it")


_PART = {"input_blocks": "input", "output_blocks": "output"}
_SECTION = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def _diffusers_order(name: str) -> tuple:
    """diffusers registers down_blocks, up_blocks, then mid_block; attn1 before attn2 in a block."""
    return (_SECTION[name.split(".")[0]], *(int(n) for n in re.findall(r"\d+", name)))


def attention_processors(model_patcher) -> list[tuple[str, BlockKey, str]]:
    """Every attention of the UNet in diffusers' ``unet.attn_processors`` order:
    ``(diffusers name, block key, "attn1"|"attn2")``, e.g.
    ``("down_blocks.0.attentions.0.transformer_blocks.0.attn2", ("input", 1, 0), "attn2")``.
    Derived from the host's own diffusers ↔ ComfyUI key map (``comfy.utils.unet_to_diffusers``)."""
    import comfy.utils
    mapping = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    found = {}
    for diffusers_key, comfy_key in mapping.items():
        match = re.match(r"(.*\.transformer_blocks\.\d+\.(attn[12]))\.to_q\.weight$", diffusers_key)
        if match is None:
            continue
        where = re.match(r"(?:(input_blocks|output_blocks)\.(\d+)|middle_block)\.\d+\.transformer_blocks\.(\d+)\.",
                         comfy_key)
        part, number, index = where.groups()
        key = (_PART[part], int(number), int(index)) if part else ("middle", 0, int(index))
        found[match.group(1)] = (key, match.group(2))
    return [(name, *found[name]) for name in sorted(found, key=_diffusers_order)]


# --- patch registration on a cloned ModelPatcher ---------------------------------------------

def set_attn1_replace(m, fn, key: BlockKey) -> None:
    m.set_model_attn1_replace(fn, key[0], key[1], key[2])


def set_attn2_replace(m, fn, key: BlockKey) -> None:
    m.set_model_attn2_replace(fn, key[0], key[1], key[2])


def attn1_replace(m, key: BlockKey):
    """The attn1 replace patch already set on m for a block, or None."""
    to = m.model_options.get("transformer_options", {})
    return to.get("patches_replace", {}).get("attn1", {}).get(key)


def attn2_replace(m, key: BlockKey):
    to = m.model_options.get("transformer_options", {})
    return to.get("patches_replace", {}).get("attn2", {}).get(key)


def add_attn1_patch(m, fn) -> None:
    m.set_model_attn1_patch(fn)


def add_attn1_output_patch(m, fn) -> None:
    m.set_model_attn1_output_patch(fn)


def set_apply_model_wrapper(m, fn) -> None:
    """Install (once per MODEL clone) the wrapper around ``BaseModel._apply_model``, and make
    sure the patches' ``cleanup()`` runs after sampling on every host."""
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, fn)
    ensure_cleanup(m)


def ensure_cleanup(m) -> None:
    """Make sure the patches' ``cleanup()`` runs after sampling on every host."""
    if not hasattr(m, "model_patches_call_function"):
        # a host whose patcher does not clean its patches up: the same call, from its cleanup callback
        m.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, WRAPPER_KEY)
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, WRAPPER_KEY, cleanup_patches)


def cleanup_patches(m) -> None:
    """Call ``cleanup()`` on every patch object of a patcher (what newer hosts do themselves)."""
    to = m.model_options.get("transformer_options", {})
    found = [p for ps in to.get("patches", {}).values() for p in ps]
    found += [p for ps in to.get("patches_replace", {}).values() for p in ps.values()]
    for patch in found:
        if hasattr(patch, "cleanup"):
            patch.cleanup()


def set_outer_sample_wrapper(m, key: str, fn) -> None:
    """Install (once per MODEL clone and key) a wrapper around the guider's ``outer_sample``."""
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, fn)
    ensure_cleanup(m)


def set_option(m, name: str, value) -> None:
    """A value in ``transformer_options`` (patches read it from ``extra_options``)."""
    m.model_options.setdefault("transformer_options", {})[name] = value


def get_option(m, name: str, default=None):
    return m.model_options.get("transformer_options", {}).get(name, default)
