"""Which ComfyUI hosts carry the DiT hooks the DiT nodes are built on.

Flux, Flux.2, Chroma and Qwen-Image blocks call ``attn1_patch(q, k, v, pe=, attn_mask=,
extra_options=)`` (``extra_options`` with ``block_type``, ``block_index``, ``img_slice`` and
``reference_image_num_tokens``) since ComfyUI 0.17.0: the hooks were merged on 2026-03-09
(Comfy-Org/ComfyUI #12861 for Flux, #12879 for Qwen-Image, with ``FluxKVCache`` #12905 as their
worked example); 0.16.3 (2026-03-06) is the last release without them, and 0.17.1
(2026-03-13) changed only version metadata against 0.17.0. Older hosts run these blocks
without the hooks, so the DiT nodes refuse there with one message.
"""
from __future__ import annotations

import inspect
import re

MIN_VERSION = (0, 17, 0)
MIN_VERSION_TEXT = ".".join(map(str, MIN_VERSION))


def host_version() -> tuple[int, ...] | None:
    """The running ComfyUI's version, e.g. (0, 33, 0); None when it does not say."""
    try:
        import comfyui_version
    except ImportError:
        return None
    found = re.findall(r"\d+", str(getattr(comfyui_version, "__version__", "")))
    return tuple(int(p) for p in found[:3]) or None


def _blocks_call_the_hooks() -> bool:
    """The host's Flux and Qwen-Image joint attentions call ``attn1_patch`` (read from their source)."""
    from comfy.ldm.flux import layers
    from comfy.ldm.qwen_image import model as qwen
    try:
        sources = [inspect.getsource(f) for f in (layers.DoubleStreamBlock.forward, layers.SingleStreamBlock.forward,
                                                   qwen.Attention.forward)]
    except (OSError, TypeError):
        return True                      # no source to read (a frozen install): the version decides
    return all("attn1_patch" in s for s in sources)


def hooks_available() -> bool:
    version = host_version()
    return version is not None and version >= MIN_VERSION and _blocks_call_the_hooks()


def require_dit_hooks(node: str) -> None:
    """Raise the one message of every DiT node on a host without the hooks."""
    if hooks_available():
        return
    version = host_version()
    found = "an unknown version" if version is None else ".".join(map(str, version))
    raise ValueError(f"{node}: needs ComfyUI {MIN_VERSION_TEXT} or newer, whose Flux, Flux.2, Chroma and Qwen-Image "
                     f"blocks offer the attention hooks (attn1_patch) this node works through; this ComfyUI is "
                     f"{found}. Update ComfyUI; the SD1.5/SDXL nodes work on this version.")
