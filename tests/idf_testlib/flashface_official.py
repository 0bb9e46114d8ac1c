"""The official FlashFace ``RefStableUNet`` forward pass, re-implemented on the test side.

Written from the semantics of ali-vilab/FlashFace ``flashface/all_finetune/models/
reference_unet.py`` (``RefStableUNet.forward``, ``init_refnet``'s ``forward_with_ref`` and
``switch_mode``) and ``ldm/models/unet.py`` (``UNet.encode``/``decode``/``_forward_single``),
on top of the official-layout modules of :mod:`flashface_fixtures` (not a copy of either,
and independent of IDFusion's code and key mapping). What the official code does, step by
step:

1. ``e = time_embedding(sinusoidal(t))`` for the batch (``t`` repeated per condition).
2. Reference pass (``switch_mode('w')``): the **reference** encoder (``ref_encoder``, four
   input channels, plain transformer blocks), then the **main** middle block (``self.middle``
   is never switched; ``ref_middle`` is unused), then the **reference** decoder, on the
   clean reference latents ``[N, 4, h_r, w_r]`` with ``e[:1]`` repeated N times and the null
   context repeated N times. Each transformer block of the middle and the decoder stores
   ``y = norm1(x)`` (``[N, L_r, C]``) under its position (the main and the reference decoder
   have the same layout, so the keys line up) and continues with its own ``self_attn(y)``.
   The output head's result is thrown away.
3. Main pass (``switch_mode('pr')``): the input is ``cat[x, mask]`` (five channels); the
   main encoder runs plainly; each transformer block of the middle and the decoder does

       y = norm1(x)
       x = x + self_attn(y)
       x = x + λ·A′(y, cat[y, ref_1..ref_N]) + (1 − λ)·A′(y, y)
       x = x + cross_attn(norm2(x), context);  x = x + ffn(norm3(x))

   with A′ = ``self_attn.self_attn_first`` and the stored references of that block laid
   side by side as one key sequence ``[N·L_r, C]`` for every batch row.

λ is per batch row here; :func:`official_similarity` gives the rows' λ as the official code
lays them out (``num_diff_condition`` 2: the scalar for every row; 3: ``[λ, 0, 0]`` per third
of the batch, condition-major).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .flashface_fixtures import (GroupNorm, OfficialUNet, ResidualBlock, StackedAttentionBlocks, Upsample,
                                 official_flashface_modules, sinusoidal_embedding)

#: Transformer-block position: (part, index in that part's ModuleList, block index in the stack).
Key = tuple[str, int, int]

WRITE, READ, PLAIN = "w", "pr", None


def modules_from_checkpoint(path, dim: int, context_dim: int, num_heads: int) -> tuple[OfficialUNet, OfficialUNet]:
    """(main, reference) holding the tensors of an official-layout checkpoint file, read by
    their official names (no IDFusion code). The main UNet loads strictly from the un-prefixed
    keys; the reference network gets ``ref_encoder.*``/``ref_decoder.*`` only, and its time
    embedding, middle block and head stay on the meta device: the official forward never uses
    them (a use would fail)."""
    from pathlib import Path
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    main, reference = official_flashface_modules(dim, context_dim, num_heads, device="meta")
    main.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("ref_", "ori_"))}, strict=True, assign=True)
    own = {k[len("ref_"):]: v for k, v in sd.items() if k.startswith(("ref_encoder.", "ref_decoder."))}
    missing, unexpected = reference.load_state_dict(own, strict=False, assign=True)
    unused = ("time_embedding.", "middle.", "head.")
    if unexpected or not all(k.startswith(unused) for k in missing):
        raise ValueError(f"{path.name}: reference network keys do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return main.eval(), reference.eval()


def official_similarity(similarity: float, num_diff_condition: int, num_samples: int = 1) -> torch.Tensor:
    """λ per batch row as ``forward_with_ref`` applies it: ``[B]`` with B = conditions × samples."""
    if num_diff_condition == 2:
        return torch.full((2 * num_samples,), float(similarity))
    if num_diff_condition == 3:
        return torch.tensor([float(similarity), 0.0, 0.0]).repeat_interleave(num_samples)
    raise ValueError("the official forward asserts num_diff_condition in (2, 3)")


class _Pass:
    """One walk through encoder → middle → decoder → head, in one caching mode."""

    def __init__(self, mode, cache: dict, similarity: torch.Tensor | None = None, extra: bool = True):
        self.mode, self.cache, self.similarity, self.extra = mode, cache, similarity, extra

    # -- transformer blocks ------------------------------------------------------------------

    def attention_block(self, block: nn.Module, x: torch.Tensor, context: torch.Tensor, key: Key | None):
        y = block.norm1(x)
        mode = self.mode if key is not None else PLAIN
        if mode == WRITE:
            self.cache[key] = y
            x = x + block.self_attn(y)
        elif mode == READ:
            x = x + block.self_attn(y)
            if self.extra:
                b, _, c = y.shape
                refs = self.cache[key].reshape(1, -1, c).expand(b, -1, -1)       # [B, N·L_r, C]
                first = block.self_attn.self_attn_first
                lam = self.similarity.to(x).view(b, 1, 1)
                x = x + lam * first(y, torch.cat([y, refs], dim=1)) + (1 - lam) * first(y)
        else:
            x = x + block.self_attn(y)
        x = x + block.cross_attn(block.norm2(x), context)
        return x + block.ffn(block.norm3(x))

    def stacked(self, module: StackedAttentionBlocks, x, context, key: tuple | None):
        b, c, h, w = x.shape
        y = module.conv1(module.norm1(x)).view(b, c, -1).transpose(1, 2)
        for i, block in enumerate(module.blocks):
            y = self.attention_block(block, y, context, None if key is None else (*key, i))
        return module.conv2(y.transpose(1, 2).reshape(b, c, h, w)) + x

    # -- blocks ------------------------------------------------------------------------------

    def single(self, module: nn.Module, x, e, context, key, reference=None):
        if isinstance(module, ResidualBlock):
            return module(x, e)
        if isinstance(module, StackedAttentionBlocks):
            return self.stacked(module, x, context, key)
        if isinstance(module, nn.Sequential) and isinstance(module[0], Upsample):
            return module[1](module[0](x, reference))
        if isinstance(module, nn.ModuleList):
            for child in module:
                x = self.single(child, x, e, context, key, reference)
            return x
        return module(x)

    def run(self, encoder, middle, decoder, head, x, e, context):
        skips = []
        for block in encoder:                               # encoder blocks never touch the cache
            x = self.single(block, x, e, context, None)
            skips.append(x)
        for index, block in enumerate(middle):
            x = self.single(block, x, e, context, ("middle", index))
        for index, block in enumerate(decoder):
            x = torch.cat([x, skips.pop()], dim=1)
            x = self.single(block, x, e, context, ("decoder", index), skips[-1] if skips else None)
        return head(x)


@torch.no_grad()
def ref_stable_unet_forward(main: OfficialUNet, reference: OfficialUNet, x: torch.Tensor, mask: torch.Tensor,
                            t: torch.Tensor, context: torch.Tensor, ref_latents: torch.Tensor,
                            null_context: torch.Tensor, similarity: torch.Tensor, extra_attention: bool = True
                            ) -> torch.Tensor:
    """The official FlashFace UNet output (eps) for one batch.

    main, reference: the modules of ``official_flashface_modules`` (main: five-channel conv_in
    and ``self_attn_first`` on every middle/decoder self-attention; reference: its encoder and
    decoder are the checkpoint's ``ref_encoder``/``ref_decoder``).
    x: [B, 4, h, w], the UNet input x_t; mask: [B, 1, h, w], the face position channel;
    t: [B] timesteps (the official code repeats its per-sample t per condition, so every row
    of one call has the same t); context: [B, T, D]; ref_latents: [N, 4, h_r, w_r] clean
    reference latents; null_context: [1, T, D]; similarity: [B] λ per row.
    extra_attention=False skips the A′ terms: the plain fine-tuned UNet, for contrast.
    """
    b = x.shape[0]
    similarity = torch.as_tensor(similarity, dtype=torch.float32).reshape(-1)
    if similarity.numel() == 1:
        similarity = similarity.expand(b)
    if similarity.numel() != b or t.shape[0] != b or context.shape[0] != b or mask.shape[:2] != (b, 1):
        raise ValueError("x, mask, t, context and similarity must all have the batch's rows")
    e = main.time_embedding(sinusoidal_embedding(t, main.dim))
    cache: dict = {}
    n = ref_latents.shape[0]
    _Pass(WRITE, cache).run(reference.encoder, main.middle, reference.decoder, main.head, ref_latents,
                            e[:1].repeat_interleave(n, dim=0), null_context.expand(n, -1, -1))
    main_pass = _Pass(READ, cache, similarity, extra=extra_attention)
    return main_pass.run(main.encoder, main.middle, main.decoder, main.head, torch.cat([x, mask], dim=1), e, context)


def with_comfy_groupnorm_eps(main: OfficialUNet, reference: OfficialUNet) -> tuple[OfficialUNet, OfficialUNet]:
    """Copies whose residual-block and output-head GroupNorms use eps 1e-5, as ComfyUI's
    ``openaimodel.normalization`` does (its transformer-stack GroupNorms keep 1e-6, as the
    official ones). The official modules use 1e-6 everywhere; this is the one known
    difference of ComfyUI's UNet that IDFusion cannot change, so with it removed the
    comparison measures everything else at float32 rounding."""
    main, reference = copy.deepcopy(main), copy.deepcopy(reference)
    for unet in (main, reference):
        for module in unet.modules():
            if isinstance(module, ResidualBlock):
                module.layer1[0].eps = module.layer2[0].eps = 1e-5
        assert isinstance(unet.head[0], GroupNorm)
        unet.head[0].eps = 1e-5
    return main, reference
