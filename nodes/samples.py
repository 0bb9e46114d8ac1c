"""The sample photos the example workflows open with, made reachable for LoadImage.

LoadImage lists the files at the top of ComfyUI's input folder, so at start-up every photo in
the pack's ``samples/`` folder is copied there under its own name (all start with
``idfusion_``) when no file of that name exists. An existing file is never replaced, whatever
it holds: the workflows then open with the user's file of that name.
"""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("IDFusion")

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def sample_files() -> list[Path]:
    """The pack's sample photos, by name."""
    return sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def install_samples(input_dir: str | Path | None = None) -> list[Path]:
    """Copy each sample photo into ``input_dir`` (ComfyUI's input folder by default) unless a file
    of that name is there; returns the files written. Never overwrites, never raises for a
    folder it cannot write to (the workflows then ask for the photos like any other)."""
    if input_dir is None:
        import folder_paths
        input_dir = folder_paths.get_input_directory()
    folder = Path(input_dir)
    written = []
    for sample in sample_files():
        target = folder / sample.name
        try:
            _copy_new(sample, target)
        except FileExistsError:
            continue
        except OSError as error:
            logger.warning("IDFusion: could not copy the sample photo %s into %s (%s); the example workflows "
                           "will ask for it", sample.name, folder, error)
            continue
        written.append(target)
    if written:
        logger.info("IDFusion: copied the example workflows' sample photos into %s: %s", folder,
                    ", ".join(p.name for p in written))
    return written


def _copy_new(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target``, which must not exist (checked by the file system, race-free);
    a copy that fails half-way is removed."""
    with open(target, "xb") as out:
        try:
            out.write(source.read_bytes())
        except BaseException:
            out.close()
            target.unlink()
            raise
