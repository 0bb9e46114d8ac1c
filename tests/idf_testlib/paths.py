"""Where the provisioned host and the generated fixtures live (both git-ignored)."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = Path(os.environ.get("IDFUSION_HOST_DIR", ROOT / ".host")).resolve()
COMFY = HOST / "ComfyUI"
VENV_PY = HOST / "venv" / "bin" / "python"
CACHE = Path(os.environ.get("IDFUSION_TEST_CACHE", ROOT / ".cache" / "fixtures")).resolve()
ARTIFACTS = Path(os.environ.get("IDFUSION_TEST_ARTIFACTS", ROOT / "test-artifacts")).resolve()
#: The package name the pack is imported under in process (the folder name in custom_nodes/).
PACK = "IDFusion"


def in_ci() -> bool:
    """True on CI (CI=true): there a missing test prerequisite is a failure, never a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
