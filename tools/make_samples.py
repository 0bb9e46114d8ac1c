#!/usr/bin/env python3
"""Write the sample photos the example workflows open with into samples/ (committed).

    .host/0.33.0/venv/bin/python tools/make_samples.py

- ``idfusion_astronaut.png``: scikit-image's ``astronaut.png`` byte for byte (Eileen Collins,
  NASA; public domain).
- ``idfusion_grace_hopper.jpg``: matplotlib's ``grace_hopper.jpg`` byte for byte (U.S. Navy
  photo of Grace Hopper, via Wikimedia Commons; public domain).
- ``idfusion_character.png``: a drawn-looking character made here from the Grace Hopper photo
  (smoothed, a few flat colours, dark outlines), the "virtual character" of the character-to-real
  workflow; public domain like its source.

The pack copies these into ComfyUI's input folder at start-up when no file of that name is
there (``nodes/samples.py``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
#: The drawn character: colours, smoothing passes, and the outline detector's window and offset.
COLOURS = 12
SMOOTHING_PASSES = 6
OUTLINE_WINDOW, OUTLINE_OFFSET = 9, 4


def astronaut_file() -> Path:
    import skimage
    return Path(skimage.__file__).parent / "data" / "astronaut.png"


def grace_hopper_file() -> Path:
    import matplotlib
    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def drawn_character(photo: np.ndarray) -> np.ndarray:
    """A comic-style drawing of an RGB photo [H, W, 3] uint8: edge-preserving smoothing, a few
    flat colours (k-means), dark outlines where the photo has edges."""
    import cv2
    cv2.setRNGSeed(0)
    smooth = photo.copy()
    for _ in range(SMOOTHING_PASSES):
        smooth = cv2.bilateralFilter(smooth, 9, 40, 7)
    pixels = smooth.reshape(-1, 3).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0)
    _, labels, centres = cv2.kmeans(pixels, COLOURS, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    flat = centres.astype(np.uint8)[labels.ravel()].reshape(photo.shape)
    gray = cv2.medianBlur(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), 7)
    paper = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, OUTLINE_WINDOW,
                                  OUTLINE_OFFSET)
    return cv2.bitwise_and(flat, flat, mask=paper)


def main() -> None:
    SAMPLES.mkdir(exist_ok=True)
    shutil.copyfile(astronaut_file(), SAMPLES / "idfusion_astronaut.png")
    shutil.copyfile(grace_hopper_file(), SAMPLES / "idfusion_grace_hopper.jpg")
    with Image.open(grace_hopper_file()) as photo:
        drawing = drawn_character(np.asarray(photo.convert("RGB")))
    Image.fromarray(drawing).save(SAMPLES / "idfusion_character.png", optimize=True)
    for path in sorted(SAMPLES.iterdir()):
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
