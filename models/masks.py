"""Identity masks: one region per identity, overlaps resolved, with a colour preview.

Regions come from MASK inputs, from face boxes grown by a margin, or from a layout of N
columns. Where regions overlap, one rule gives each pixel a single owner:

- ``earlier identity wins``: the lower identity index keeps the pixel;
- ``smaller region wins``: the region with fewer pixels keeps it (a face inside a larger
  body region stays);
- ``nearest centre``: the region whose centre of mass is nearest keeps it (adjacent grown
  boxes split down the middle).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .references import Shared

EARLIER = "earlier identity wins"
SMALLER = "smaller region wins"
NEAREST = "nearest centre"
OVERLAP_RULES = (EARLIER, SMALLER, NEAREST)

#: Preview colours per identity (RGB 0..1), cycled.
PALETTE = torch.tensor([
    [0.90, 0.25, 0.20], [0.20, 0.55, 0.90], [0.25, 0.75, 0.30], [0.95, 0.75, 0.15],
    [0.65, 0.35, 0.85], [0.10, 0.80, 0.80], [0.95, 0.50, 0.70], [0.55, 0.55, 0.55],
])


@dataclass(frozen=True, eq=False)
class IdentityMasks(Shared):
    """masks: [M, H, W] in {0, 1}, disjoint, each non-empty; labels: one name per region."""

    masks: torch.Tensor
    labels: tuple[str, ...]

    @property
    def count(self) -> int:
        return int(self.masks.shape[0])


def resolve_overlaps(masks: torch.Tensor, rule: str) -> torch.Tensor:
    """[M, H, W] (any values; > 0.5 is inside) → disjoint {0, 1} masks by ``rule``."""
    if rule not in OVERLAP_RULES:
        raise ValueError(f"overlap: unknown rule {rule!r}; choose one of {', '.join(OVERLAP_RULES)}")
    inside = masks > 0.5
    m, h, w = inside.shape
    if rule == EARLIER:
        priority = -torch.arange(m, dtype=torch.float32).view(m, 1, 1).expand(m, h, w)
    elif rule == SMALLER:
        area = inside.flatten(1).sum(1).float()
        priority = (-area).view(m, 1, 1).expand(m, h, w)
    else:
        ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
        xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
        area = inside.flatten(1).sum(1).float().clamp_min(1).view(m, 1, 1)
        cy = (inside * ys).flatten(1).sum(1).view(m, 1, 1) / area
        cx = (inside * xs).flatten(1).sum(1).view(m, 1, 1) / area
        priority = -((ys - cy) ** 2 + (xs - cx) ** 2)
    score = torch.where(inside, priority, torch.full_like(priority, float("-inf")))
    owner = score.argmax(dim=0)
    any_inside = inside.any(dim=0)
    return (F.one_hot(owner, m).permute(2, 0, 1).float() * any_inside)


def box_mask(box, height: int, width: int, margin: float, scale: tuple[float, float]) -> torch.Tensor:
    """[H, W] mask of a face box (x1, y1, x2, y2 in source pixels, scaled by ``scale`` =
    (sx, sy)), grown by ``margin`` × its size on every side, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    sx, sy = scale
    x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
    bw, bh = x2 - x1, y2 - y1
    x1, x2 = x1 - margin * bw, x2 + margin * bw
    y1, y2 = y1 - margin * bh, y2 + margin * bh
    mask = torch.zeros(height, width)
    c1, c2 = max(0, int(round(x1))), min(width, int(round(x2)))
    r1, r2 = max(0, int(round(y1))), min(height, int(round(y2)))
    mask[r1:r2, c1:c2] = 1.0
    return mask


def column_masks(count: int, height: int, width: int) -> torch.Tensor:
    """``count`` equal vertical strips, left to right: [count, H, W]."""
    edges = [round(i * width / count) for i in range(count + 1)]
    masks = torch.zeros(count, height, width)
    for i in range(count):
        masks[i, :, edges[i]:edges[i + 1]] = 1.0
    return masks


def preview(masks: torch.Tensor) -> torch.Tensor:
    """Colour image [1, H, W, 3]: each region in its identity's colour, the rest dark grey."""
    m = masks.shape[0]
    colours = PALETTE[torch.arange(m) % len(PALETTE)]
    image = torch.einsum("mhw,mc->hwc", masks.float(), colours)
    background = (1 - masks.sum(0).clamp(max=1)).unsqueeze(-1) * 0.12
    return (image + background).clamp(0, 1).unsqueeze(0)


def check_regions(masks: torch.Tensor, node: str) -> None:
    """Every identity must keep at least one pixel."""
    areas = masks.flatten(1).sum(1)
    for i, area in enumerate(areas.tolist()):
        if area == 0:
            raise ValueError(f"{node}: identity {i + 1}'s region is empty after resolving overlaps; "
                             f"make its mask or box larger, or change the overlap rule")
