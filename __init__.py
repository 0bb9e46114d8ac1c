"""IDFusion: identity-preserving personalization nodes for ComfyUI (V3 node API).

Importing the pack is cheap: face-analysis libraries (insightface, facexlib,
onnxruntime) and model code load only when a node runs.

The floor is ComfyUI 0.3.60: from there on the host's attention functions take the
``transformer_options`` the pack's attention patches pass on (on 0.3.48–0.3.59 the first
sampling step would fail). On an older host the pack logs one line and registers no node.
"""
import logging
import re

logger = logging.getLogger("IDFusion")

MIN_COMFYUI = "0.3.60"


def _as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def host_version() -> str | None:
    """The running ComfyUI's version (``comfyui_version.py`` at its root), or None if unknown."""
    try:
        from comfyui_version import __version__
    except ImportError:
        return None
    return str(__version__)


def host_problem() -> str | None:
    """Why this host cannot run the pack, or None."""
    found = host_version()
    if found is not None and _as_tuple(found) < _as_tuple(MIN_COMFYUI):
        return f"found ComfyUI {found}"
    try:
        import comfy_api.v0_0_2  # noqa: F401
    except ImportError:
        return f"found ComfyUI {found or '(version unknown)'} without the versioned V3 node API comfy_api.v0_0_2"
    return None


_problem = host_problem()
if _problem is not None:
    logger.error("IDFusion needs ComfyUI %s or newer, %s: update ComfyUI and restart it (IDFusion registers no nodes).",
                 MIN_COMFYUI, _problem)
    try:
        from comfy_api.latest import ComfyExtension as _Extension   # what older hosts' loaders check for
    except ImportError:
        _Extension = object

    class _NoNodes(_Extension):
        async def on_load(self):
            pass

        async def get_node_list(self):
            return []

    async def comfy_entrypoint() -> _NoNodes:
        return _NoNodes()
else:
    from .nodes import NODES
    from .nodes.api import ComfyExtension
    from .nodes.routes import register_routes
    from .nodes.samples import install_samples

    class IDFusionExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> IDFusionExtension:
        register_routes()
        install_samples()
        return IDFusionExtension()
