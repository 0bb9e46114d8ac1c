"""The host's node API the pack is written against.

``comfy_api.v0_0_2``, the versioned V3 node API (``io``, ``ui``, ``ComfyExtension``), rather
than ``comfy_api.latest``, which the host marks unstable. Every host from the pack's floor
(ComfyUI 0.3.60) on has it; the newest versioned API there is 0.0.2.
"""
from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
