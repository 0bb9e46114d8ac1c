#!/usr/bin/env python3
"""Draw the pack's icon, docs/icon.png (the Comfy Registry shows it; pyproject.toml points at it).

    .host/0.33.0/venv/bin/python tools/make_icon.py

Two face outlines, one in front of the other, their overlap filled: several reference faces
fused into one identity. Drawn at four times the size and scaled down (smooth edges).
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
ICON = ROOT / "docs" / "icon.png"
SIDE = 400
SCALE = 4
BACKGROUND = (24, 30, 48)
LEFT_FACE = (86, 156, 255)
RIGHT_FACE = (255, 124, 92)
FUSED = (255, 214, 102)


def face_mask(size: int, centre: tuple[float, float], radius: tuple[float, float]) -> Image.Image:
    """An 'L' mask of an upright ellipse (a face's outline)."""
    mask = Image.new("L", (size, size), 0)
    (cx, cy), (rx, ry) = centre, radius
    ImageDraw.Draw(mask).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return mask


def features(draw: ImageDraw.ImageDraw, cx: float, cy: float, unit: float, colour) -> None:
    """Eyes and a smile around (cx, cy)."""
    for dx in (-0.32, 0.32):
        ex, ey = cx + dx * unit, cy - 0.18 * unit
        draw.ellipse([ex - 0.09 * unit, ey - 0.09 * unit, ex + 0.09 * unit, ey + 0.09 * unit], fill=colour)
    box = [cx - 0.36 * unit, cy - 0.05 * unit, cx + 0.36 * unit, cy + 0.5 * unit]
    draw.arc(box, start=25, end=155, fill=colour, width=round(0.08 * unit))


def icon() -> Image.Image:
    size = SIDE * SCALE
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    radius = (0.27 * size, 0.34 * size)
    left = face_mask(size, (0.38 * size, 0.5 * size), radius)
    right = face_mask(size, (0.62 * size, 0.5 * size), radius)
    canvas.paste(LEFT_FACE, mask=left)
    canvas.paste(RIGHT_FACE, mask=right)
    canvas.paste(FUSED, mask=ImageChops.multiply(left, right))
    features(ImageDraw.Draw(canvas), 0.5 * size, 0.5 * size, 0.3 * size, BACKGROUND)
    rounded = Image.new("L", (size, size), 0)
    ImageDraw.Draw(rounded).rounded_rectangle([0, 0, size - 1, size - 1], radius=0.18 * size, fill=255)
    out = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    out.paste(canvas, mask=rounded)
    return out.resize((SIDE, SIDE), Image.Resampling.LANCZOS)


def main() -> None:
    ICON.parent.mkdir(exist_ok=True)
    icon().save(ICON, optimize=True)
    print(f"wrote {ICON}")


if __name__ == "__main__":
    main()
