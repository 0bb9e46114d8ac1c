"""The pack's ``models`` room for the converters, without ComfyUI.

The folder is imported by its path as the package ``idfusion_models``, so the pack's folder may
have any name (a git clone, a ComfyUI-Manager install) and the modules' relative imports (e.g.
``..files``) work. Only modules that import nothing but torch and safetensors are loaded here.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "models"
PACKAGE = "idfusion_models"


def load(name: str):
    """``models/<name>.py`` (dotted, e.g. ``"flashface.weights"``) as ``idfusion_models.<name>``."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, MODELS / "__init__.py",
                                                      submodule_search_locations=[str(MODELS)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{name}")
