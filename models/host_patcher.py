"""The pack's own weights, wrapped the way the host's own loaders wrap theirs.

ComfyUI's loaders build a module, wrap it in ``comfy.model_patcher.CoreModelPatcher`` (since
dynamic VRAM: ``ModelPatcherDynamic`` on NVIDIA GPUs, the classic ``ModelPatcher`` on the CPU
and on hosts that predate it) and then load the weights into it, by assignment when the
patcher is dynamic, so the host can stream and evict them. IDFusion's ReferenceNet, A′,
fused-KV adapters and face parser go the same way.
"""
from __future__ import annotations

import torch


def patcher_class():
    """The host's ``CoreModelPatcher`` (what its loaders use), or ``ModelPatcher`` before it existed."""
    import comfy.model_patcher as mp
    return getattr(mp, "CoreModelPatcher", mp.ModelPatcher)


def wrap(module: torch.nn.Module, state_dict: dict | None = None, what: str = "weights",
         into: torch.nn.Module | None = None):
    """A host patcher around ``module``; ``state_dict`` (if given) is then loaded strictly into
    ``into`` (default: ``module`` itself), by assignment where the patcher is dynamic.
    Raises ValueError naming what does not fit."""
    import comfy.model_management as mm

    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    patcher = patcher_class()(module, load_device=load_device, offload_device=offload_device)
    if state_dict is not None:
        dynamic = bool(getattr(patcher, "is_dynamic", lambda: False)())
        if not dynamic and not mm.is_device_cpu(offload_device):
            module.to(offload_device)
        missing, unexpected = (into or module).load_state_dict(state_dict, strict=False, assign=dynamic)
        if missing or unexpected:
            raise ValueError(f"{what}: the weights do not fit (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")
    module.eval()
    return patcher
