"""Where the provisioned host and the generated fixtures live (both git-ignored).

``tools/host.py test`` sets ``IDFUSION_HOST_DIR`` and ``IDFUSION_HOST_NAME`` for each host it
tests; fixtures (written the way each host's own save path writes them) and artifacts are
kept per host.
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST_NAME = os.environ.get("IDFUSION_HOST_NAME", "0.3.75")
HOST = Path(os.environ.get("IDFUSION_HOST_DIR", ROOT / ".host" / HOST_NAME)).resolve()
COMFY = HOST / "ComfyUI"
VENV_PY = HOST / "venv" / "bin" / "python"
CACHE = Path(os.environ.get("IDFUSION_TEST_CACHE", ROOT / ".cache" / "fixtures" / HOST_NAME)).resolve()
ARTIFACTS = Path(os.environ.get("IDFUSION_TEST_ARTIFACTS", ROOT / "test-artifacts" / HOST_NAME)).resolve()
#: The package name the pack is imported under in process (the folder name in custom_nodes/).
PACK = "IDFusion"
#: The pack as ComfyUI's loader sees it: a link to this checkout in a custom_nodes folder of
#: the checkout's own (test servers add that folder through their extra_model_paths file), so
#: several checkouts can share one provisioned host.
CUSTOM_NODES = ROOT / ".cache" / "custom_nodes"
PACK_LINK = CUSTOM_NODES / PACK
#: Test-only nodes that test servers load beside the pack (tests/idf_testlib/server_nodes).
TEST_NODES = Path(__file__).resolve().parent / "server_nodes"
TEST_NODES_LINK = CUSTOM_NODES / "idfusion_test_nodes"


def _link(link: Path, target: Path) -> None:
    if not (link.is_symlink() and link.resolve() == target):
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)


def ensure_pack_link() -> Path:
    """Make ``PACK_LINK`` point at this checkout (and the test nodes' link at them); returns it."""
    CUSTOM_NODES.mkdir(parents=True, exist_ok=True)
    _link(PACK_LINK, ROOT)
    _link(TEST_NODES_LINK, TEST_NODES)
    return PACK_LINK


def in_ci() -> bool:
    """True on CI (CI=true): there a missing test prerequisite is a failure, never a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def comfy_version() -> tuple[int, ...]:
    """The host's ComfyUI version as a tuple of ints, e.g. (0, 33, 0)."""
    import re
    text = (COMFY / "comfyui_version.py").read_text()
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text).group(1)
    return tuple(int(p) for p in re.findall(r"\d+", found)[:3])
