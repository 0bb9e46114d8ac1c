"""Running a reference UNet on clean reference latents and collecting its hidden states.

The reference network is a UNet whose encoder and decoder may be its own (FlashFace's
fine-tuned ReferenceNet) or the sampled UNet's (training-free), while the time embedding,
the middle block and the head are always the sampled UNet's, as in FlashFace's official
code. The pass mirrors ComfyUI's ``UNetModel._forward`` block by block and stops after the
last block whose features are wanted. Features are gathered with ``attn1_patch`` /
``attn2_patch`` hooks that only read: ``norm1(x)`` (kind ``attn1``) and ``norm2(x)``
(kind ``attn2``) of each wanted transformer block.
"""
from __future__ import annotations

import torch

from .feature_cache import FeatureKey, Features


def _collector(kind: str, wanted: set[FeatureKey], out: Features):
    def collect(n, context_attn, value_attn, extra_options):
        block = extra_options.get("block")
        if block is not None:
            key = ((block[0], block[1], extra_options.get("block_index", 0)), kind)
            if key in wanted:
                out[key] = n
        return n, context_attn, value_attn
    return collect


def _last_block(wanted: set[FeatureKey]) -> tuple[str, int]:
    order = {"input": 0, "middle": 1, "output": 2}
    return max(((k[0][0], k[0][1]) for k in wanted), key=lambda b: (order[b[0]], b[1]))


def reference_forward(unet: torch.nn.Module, input_blocks, output_blocks, x: torch.Tensor,
                      timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                      wanted: set[FeatureKey]) -> Features:
    """Run the reference network and return the wanted features ``{(block key, kind): [N, L, C]}``.

    unet: ComfyUI's ``UNetModel`` (time embedding, label embedding, middle block);
    input_blocks / output_blocks: the reference encoder and decoder (ModuleLists in
    ComfyUI's layout); x: [N, C, h, w] clean latents; timesteps: [N]; context: [N, T, D].
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed, timestep_embedding

    features: Features = {}
    options = {
        "patches": {"attn1_patch": [_collector("attn1", wanted, features)],
                    "attn2_patch": [_collector("attn2", wanted, features)]},
        "original_shape": list(x.shape), "transformer_index": 0,
    }
    stop = _last_block(wanted)
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)

    h, skips = x, []
    for number, module in enumerate(input_blocks):
        options["block"] = ("input", number)
        h = forward_timestep_embed(module, h, emb, context, options)
        skips.append(h)
        if stop == ("input", number):
            return features
    options["block"] = ("middle", 0)
    h = forward_timestep_embed(unet.middle_block, h, emb, context, options)
    if stop[0] == "middle":
        return features
    for number, module in enumerate(output_blocks):
        options["block"] = ("output", number)
        h = torch.cat([h, skips.pop()], dim=1)
        output_shape = skips[-1].shape if skips else None
        h = forward_timestep_embed(module, h, emb, context, options, output_shape)
        if stop == ("output", number):
            break
    return features
