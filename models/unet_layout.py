"""The transformer blocks of a ComfyUI ``UNetModel``, by the key ComfyUI's attention patches use.

A block is ``(block_name, number, index)``: ``"input" | "middle" | "output"``, its position in
that list, and the index of the BasicTransformerBlock inside the SpatialTransformer.
Patches look their block up here in the model being run (``block_modules``), never keep
the modules of the model they were made from.
"""
from __future__ import annotations

import weakref

BlockKey = tuple[str, int, int]

_by_unet: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _blocks_of(name: str, container) -> list:
    from comfy.ldm.modules.attention import SpatialTransformer

    found = []
    for number, module in enumerate(container):
        for layer in module:
            if isinstance(layer, SpatialTransformer):
                found += [((name, number, i), blk) for i, blk in enumerate(layer.transformer_blocks)]
    return found


def transformer_blocks(unet) -> dict:
    """Every BasicTransformerBlock of a ComfyUI ``UNetModel``, by its patch key, in forward order."""
    found = _blocks_of("input", unet.input_blocks)
    if unet.middle_block is not None:
        found += _blocks_of("middle", [unet.middle_block])
    found += _blocks_of("output", unet.output_blocks)
    return dict(found)


def block_modules(unet) -> dict:
    """``transformer_blocks(unet)``, worked out once per UNet module."""
    blocks = _by_unet.get(unet)
    if blocks is None:
        blocks = _by_unet[unet] = transformer_blocks(unet)
    return blocks
