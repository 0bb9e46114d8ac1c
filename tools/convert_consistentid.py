#!/usr/bin/env python3
"""Convert a ConsistentID release (a pickle) into a .safetensors file IDFusion reads the same way.

    python tools/convert_consistentid.py ConsistentID-v1.bin ConsistentID-v1.safetensors [--fp16]

The file is read with ``torch.load(weights_only=True)`` (nothing but tensors is unpickled) and
checked: the three groups (FacialEncoder, image_proj or image_proj_model, adapter_modules), every
adapter key, and the two networks built from their shapes. The result holds the same tensors
under ``<group>.<key>`` (``image_proj_model`` written as ``image_proj``), in their own dtypes or,
with ``--fp16``, in float16. Needs only torch and safetensors, not ComfyUI.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_models import load  # noqa: E402  (tools/pack_models.py, also under ``python -m tools...``)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert_consistentid", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="ConsistentID-v1.bin or ConsistentID_SDXL-v1.bin")
    parser.add_argument("dst", type=Path, help="the .safetensors file to write (e.g. models/consistentid/...)")
    parser.add_argument("--fp16", action="store_true", help="store floating-point tensors as float16")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dst.suffix.lower() != ".safetensors":
        sys.exit(f"convert_consistentid: DST must end in .safetensors, got {args.dst}")
    if args.dst.exists() and not args.force:
        sys.exit(f"convert_consistentid: {args.dst} exists; pass --force to overwrite it")
    checkpoint, modules = load("consistentid.checkpoint"), load("consistentid.modules")
    import torch
    try:
        groups = checkpoint.group(checkpoint.read_file(str(args.src)), args.src.name)
        checkpoint.check_groups(groups, args.src.name)
        checkpoint.parse_adapter(groups["adapter_modules"], args.src.name)
        modules.build_id_projection(groups["image_proj"])
        modules.build_facial_encoder(groups["FacialEncoder"])
        count = checkpoint.write_safetensors(groups, str(args.dst), torch.float16 if args.fp16 else None)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"convert_consistentid: {e}")
    print(f"convert_consistentid: {count} tensors written to {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
