#!/usr/bin/env python3
"""Convert the official FlashFace checkpoint into IDFusion's compact fp16 file.

    python tools/convert_flashface.py flashface.ckpt flashface-idfusion.safetensors
    python -m tools.convert_flashface SRC DST        (from the pack's folder)

The official ``flashface.ckpt`` (10.6 GB, fp32) holds three copies of the UNet; the result
keeps the main UNet, the reference network's encoder/decoder and the extra attentions, in
ComfyUI's key names and fp16 (about 3.3 GB), and loads faster. Needs only torch and
safetensors, not ComfyUI; ``models/flashface/weights.py`` is loaded by its path, so the
pack's folder may have any name (tools/pack_models.py). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_models import load  # noqa: E402  (tools/pack_models.py, also under ``python -m tools...``)


class StderrProgress:
    """A one-line progress report on stderr: '<label>: done/total (percent)'."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{self.label}: {done}/{total} ({100 * done // max(total, 1)}%, "
                         f"{time.monotonic() - self.start:.0f} s){end}")
        sys.stderr.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert_flashface", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="flashface.ckpt (or .safetensors with the official keys)")
    parser.add_argument("dst", type=Path, help="the .safetensors file to write (e.g. models/flashface/flashface-idfusion.safetensors)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.dst.suffix.lower() != ".safetensors":
        sys.exit(f"convert_flashface: DST must end in .safetensors, got {args.dst}")
    if args.src.resolve() == args.dst.resolve():
        sys.exit(f"convert_flashface: source and destination are the same file ({args.src})")
    if args.dst.exists() and not args.force:
        sys.exit(f"convert_flashface: {args.dst} exists; pass --force to overwrite it")
    weights_module = load("flashface.weights")
    try:
        weights = weights_module.load_flashface(args.src, StderrProgress(f"reading {args.src.name}"))
        weights_module.save_converted(weights, args.dst, StderrProgress(f"writing {args.dst.name}"))
    except (OSError, ValueError) as e:
        sys.exit(f"convert_flashface: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
