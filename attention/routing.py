"""Which identity each query attends to: identity masks at any layer resolution.

A UNet layer at depth k holds ``ceil(H/2^k) × ceil(W/2^k)`` tokens for an ``H × W`` latent
(stride-2 convolutions with padding 1 round up), so token (r, c) covers latent rows
``[r·2^k, (r+1)·2^k)`` and columns ``[c·2^k, (c+1)·2^k)``, cut at the border. A token
belongs to the identity that covers the largest part of that cell (a tie goes to the lower
identity index), provided the identity masks together cover at least half of it; otherwise
it is outside every region.

``query_weights`` turns that into ``α [B, L, M]``: 1 on the owning identity, 0 on the
others (the route of face-fusion eq. 7: no attention to other identities' keys), and for
tokens outside every region either the mixing weights (``outside="all"``) or zeros
(``outside="none"``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OUTSIDE_ALL = "all"
OUTSIDE_NONE = "none"


def layer_grid(seq_len: int, height: int, width: int) -> tuple[int, int, int]:
    """``(h, w, factor)`` of the layer with ``seq_len`` tokens for an ``height × width`` latent."""
    factor = 1
    while factor <= max(height, width) * 2:
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        if h * w == seq_len:
            return h, w, factor
        factor *= 2
    raise ValueError(f"no layer of a {height}×{width} latent has {seq_len} tokens")


def cell_coverage(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean of each ``factor × factor`` cell, cells cut at the border: [..., H, W] → [..., h, w]."""
    if factor == 1:
        return masks.float()
    *lead, height, width = masks.shape
    h, w = math.ceil(height / factor), math.ceil(width / factor)
    flat = masks.float().reshape(-1, 1, height, width)
    pad = (0, w * factor - width, 0, h * factor - height)
    sums = F.avg_pool2d(F.pad(flat, pad), factor, divisor_override=1)
    counts = F.avg_pool2d(F.pad(torch.ones_like(flat[:1]), pad), factor, divisor_override=1)
    return (sums / counts).reshape(*lead, h, w)


def owners(coverage: torch.Tensor) -> torch.Tensor:
    """One-hot owner per token from per-identity coverage ``[..., M, h, w]`` (see module doc)."""
    total = coverage.sum(dim=-3, keepdim=True)
    best = coverage.argmax(dim=-3, keepdim=True)
    one_hot = torch.zeros_like(coverage).scatter_(-3, best, 1.0)
    return one_hot * (total >= 0.5)


def query_weights(masks: torch.Tensor, seq_len: int, latent_hw: tuple[int, int],
                  mix: torch.Tensor, outside: str) -> torch.Tensor:
    """α for one layer: masks ``[M, H, W]`` or ``[B, M, H, W]`` at latent size → ``[B|1, L, M]``.

    mix: [M] weights for tokens outside every region when ``outside == "all"``.
    """
    if outside not in (OUTSIDE_ALL, OUTSIDE_NONE):
        raise ValueError(f"outside must be '{OUTSIDE_ALL}' or '{OUTSIDE_NONE}', got {outside!r}")
    if masks.ndim == 3:
        masks = masks.unsqueeze(0)
    height, width = latent_hw
    if tuple(masks.shape[-2:]) != (height, width):
        raise ValueError(f"identity masks are {masks.shape[-2]}×{masks.shape[-1]} but the latent is {height}×{width}")
    h, w, factor = layer_grid(seq_len, height, width)
    own = owners(cell_coverage(masks, factor))                            # [B, M, h, w]
    alpha = own.flatten(2).transpose(1, 2)                                # [B, L, M]
    if outside == OUTSIDE_ALL:
        free = (alpha.sum(-1, keepdim=True) == 0).float()
        alpha = alpha + free * mix.to(alpha).view(1, 1, -1)
    return alpha


def fit_to_latent(masks: torch.Tensor, height: int, width: int, what: str = "mask", pixels_per_unit: int = 8,
                  fix: str = "make it at the image size (or the same aspect ratio)") -> torch.Tensor:
    """Resize ``[..., Hm, Wm]`` masks (pixel or latent size) to ``height × width`` (a latent,
    whose image is ``pixels_per_unit`` times larger; 1 when the target is itself in pixels).

    Any size with the target's aspect ratio is accepted (within 2 %); a different aspect
    ratio is an error ("<what> is … but the image being generated is …; <fix>"), because
    stretching would move the regions.
    """
    hm, wm = masks.shape[-2:]
    if abs(hm / wm - height / width) > 0.02 * (height / width):
        raise ValueError(f"{what} is {wm}×{hm} (w×h) but the image being generated is "
                         f"{width * pixels_per_unit}×{height * pixels_per_unit}; {fix}")
    if (hm, wm) == (height, width):
        return masks.float()
    lead = masks.shape[:-2]
    flat = masks.float().reshape(-1, 1, hm, wm)
    return F.interpolate(flat, size=(height, width), mode="area" if hm >= height else "nearest").reshape(*lead, height, width)
