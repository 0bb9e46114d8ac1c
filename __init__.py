"""IDFusion: identity-preserving personalization nodes for ComfyUI (V3 node API).

Importing the pack is cheap: face-analysis libraries (insightface, facexlib,
onnxruntime) and model code load only when a node runs.
"""
import logging

logger = logging.getLogger("IDFusion")

MIN_COMFYUI = "0.3.48"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # an older host without the V3 node API
    logger.error("IDFusion needs ComfyUI %s or newer (the V3 node API, comfy_api.latest, is missing): "
                  "update ComfyUI, then restart it.", MIN_COMFYUI)
else:
    from .nodes import NODES
    from .nodes.routes import register_routes

    class IDFusionExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> IDFusionExtension:
        register_routes()
        return IDFusionExtension()
