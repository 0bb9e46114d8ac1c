"""Synthetic FlashFace checkpoints with the official key names and shapes.

The module tree here reproduces, in parameter names and shapes, the official FlashFace UNet
(ali-vilab/FlashFace ``ldm/models/unet.py``) and what ``RefStableUNet.init_refnet`` and
``replace_input_conv`` add to it (``flashface/all_finetune/models/reference_unet.py``):

- ``ref_encoder``/``ref_decoder``/``ref_middle``: copies of the UNet taken *before* the
  changes below (so ``ref_encoder.0`` keeps 4 input channels and the reference decoder has
  no extra attention);
- ``self_attn.self_attn_first``: one extra attention (q, k, v without bias; o with bias)
  beside every self-attention of the decoder and the middle;
- ``encoder.0``: a 5-input-channel conv (latent + face position mask);
- ``ori_encoder``/``ori_middle``/``ori_decoder``: aliases of the main UNet's parts, so the
  saved state dict holds a second copy of them.

It is written from the official code, independently of ``models/flashface/weights.py``,
so the mapping tests are not circular. ``OfficialUNet.forward`` runs like the official
UNet without reference attention, so a ComfyUI UNet holding the mapped weights can be
compared with it on outputs.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .models import SD15_TINY, init_weights
from .paths import CACHE

#: Bump when the generated key set or values change (the file names carry it).
FIXTURE_VERSION = 2
#: The released model's widths (``sd_v1_ref_unet``: dim 320, context 768, 8 heads).
FULL = dict(dim=320, context_dim=768, num_heads=8)
#: The tiny widths of SD15_TINY. Heads: 8, not SD15_TINY's 4, because comfy.supported_models.SD15
#: forces num_heads 8 (its unet_extra_config) whatever the config says; the head count changes
#: no shape, only the attention's result, which the forward comparison needs equal.
TINY = dict(dim=SD15_TINY["model_channels"], context_dim=SD15_TINY["context_dim"], num_heads=8)


class GroupNorm(nn.GroupNorm):
    """The official GroupNorm: 32 groups, eps 1e-6, computed in float32."""

    def __init__(self, dim: int):
        super().__init__(32, dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the size of the skip tensor (no parameters)."""

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=reference.shape[-2:], mode="nearest")


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, embed_dim: int, out_dim: int):
        super().__init__()
        self.layer1 = nn.Sequential(GroupNorm(in_dim), nn.SiLU(), nn.Conv2d(in_dim, out_dim, 3, padding=1))
        self.embedding = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_dim))
        self.layer2 = nn.Sequential(GroupNorm(out_dim), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_dim, out_dim, 3, padding=1))
        self.shortcut = nn.Identity() if in_dim == out_dim else nn.Conv2d(in_dim, out_dim, 1)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.layer1(x) + self.embedding(e)[..., None, None]
        return self.layer2(h) + self.shortcut(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(context_dim or dim, dim, bias=False)
        self.v = nn.Linear(context_dim or dim, dim, bias=False)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, C]; context: [B, L2, C2] or None (self-attention)."""
        context = x if context is None else context
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q, k, v = (t.view(b, -1, n, d).transpose(1, 2) for t in (self.q(x), self.k(context), self.v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, -1, n * d))


class GeGLU(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, None, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, context_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(GeGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ffn(self.norm3(x))


class StackedAttentionBlocks(nn.Module):
    def __init__(self, dim: int, context_dim: int, num_heads: int, num_blocks: int = 1):
        super().__init__()
        self.norm1 = GroupNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.blocks = nn.ModuleList([AttentionBlock(dim, context_dim, num_heads) for _ in range(num_blocks)])
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.conv1(self.norm1(x)).flatten(2).transpose(1, 2)
        for block in self.blocks:
            y = block(y, context)
        return self.conv2(y.transpose(1, 2).reshape(b, c, h, w)) + x


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim]: cos then sin, frequencies 10000^(-i/half)."""
    half = dim // 2
    sinusoid = torch.outer(t.float(), torch.pow(10000, -torch.arange(half).float().div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class OfficialUNet(nn.Module):
    """The official FlashFace/SD1.5 UNet layout: dim_mult (1, 2, 4, 4), 2 residual blocks per
    level, attention at scales 1, 1/2 and 1/4."""

    def __init__(self, in_dim: int = 4, dim: int = 320, context_dim: int = 768, num_heads: int = 8,
                 dim_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_scales: tuple[float, ...] = (1 / 4, 1 / 2, 1)):
        super().__init__()
        self.dim = dim
        embed_dim = dim * 4
        enc_dims = [dim * u for u in (1, *dim_mult)]
        dec_dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        skip_dims = [dim]
        scale = 1.0
        self.time_embedding = nn.Sequential(nn.Linear(dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

        self.encoder = nn.ModuleList([nn.Conv2d(in_dim, dim, 3, padding=1)])
        for level, (d_in, d_out) in enumerate(zip(enc_dims[:-1], enc_dims[1:])):
            for j in range(num_res_blocks):
                block = nn.ModuleList([ResidualBlock(d_in, embed_dim, d_out)])
                if scale in attn_scales:
                    block.append(StackedAttentionBlocks(d_out, context_dim, num_heads))
                d_in = d_out
                self.encoder.append(block)
                skip_dims.append(d_out)
                if level != len(dim_mult) - 1 and j == num_res_blocks - 1:
                    self.encoder.append(nn.Conv2d(d_out, d_out, 3, stride=2, padding=1))
                    skip_dims.append(d_out)
                    scale /= 2

        self.middle = nn.ModuleList([ResidualBlock(d_out, embed_dim, d_out),
                                     StackedAttentionBlocks(d_out, context_dim, num_heads),
                                     ResidualBlock(d_out, embed_dim, d_out)])

        self.decoder = nn.ModuleList()
        for level, (d_in, d_out) in enumerate(zip(dec_dims[:-1], dec_dims[1:])):
            for j in range(num_res_blocks + 1):
                block = nn.ModuleList([ResidualBlock(d_in + skip_dims.pop(), embed_dim, d_out)])
                if scale in attn_scales:
                    block.append(StackedAttentionBlocks(d_out, context_dim, num_heads))
                d_in = d_out
                if level != len(dim_mult) - 1 and j == num_res_blocks:
                    block.append(nn.Sequential(Upsample(), nn.Conv2d(d_out, d_out, 3, padding=1)))
                    scale *= 2
                self.decoder.append(block)

        self.head = nn.Sequential(GroupNorm(d_out), nn.SiLU(), nn.Conv2d(d_out, 4, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: [B, in_dim, H, W] (H, W divisible by 8), t: [B] timesteps, context: [B, L, context_dim]."""
        e = self.time_embedding(sinusoidal_embedding(t, self.dim))
        skips = []
        for block in self.encoder:
            x = self._run(block, x, e, context, None)
            skips.append(x)
        for block in self.middle:
            x = self._run(block, x, e, context, None)
        for block in self.decoder:
            x = torch.cat([x, skips.pop()], dim=1)
            x = self._run(block, x, e, context, skips[-1] if skips else None)
        return self.head(x)

    def _run(self, module: nn.Module, x, e, context, reference):
        if isinstance(module, ResidualBlock):
            return module(x, e)
        if isinstance(module, StackedAttentionBlocks):
            return module(x, context)
        if isinstance(module, nn.Sequential) and isinstance(module[0], Upsample):
            return module[1](module[0](x, reference))
        if isinstance(module, nn.ModuleList):
            for child in module:
                x = self._run(child, x, e, context, reference)
            return x
        return module(x)


def add_extra_attentions(unet: OfficialUNet) -> int:
    """Give every self-attention of the decoder and the middle a ``self_attn_first`` sibling,
    as ``init_refnet`` does. Returns how many were added."""
    targets = [m for part in (unet.decoder, unet.middle) for name, m in part.named_modules()
               if isinstance(m, MultiHeadAttention) and name.endswith("self_attn")]
    for attention in targets:
        attention.self_attn_first = MultiHeadAttention(attention.q.in_features, None, attention.num_heads)
    return len(targets)


def official_flashface_modules(dim: int, context_dim: int, num_heads: int, seed: int = 0,
                               device: torch.device | str | None = None) -> tuple[OfficialUNet, OfficialUNet]:
    """The main UNet (5-channel conv_in, extra attentions) and the reference network
    (its encoder, middle and decoder are the checkpoint's ref_*), random unless on meta."""
    with torch.device(device or "cpu"):
        main = OfficialUNet(4, dim, context_dim, num_heads)
        reference = OfficialUNet(4, dim, context_dim, num_heads)
        add_extra_attentions(main)
        main.encoder[0] = nn.Conv2d(5, dim, 3, padding=1)
    if torch.device(device or "cpu").type != "meta":
        init_weights(main, seed)
        init_weights(reference, seed + 1)
    return main.eval(), reference.eval()


def official_state_dict(main: OfficialUNet, reference: OfficialUNet, ori_copies: bool = True) -> dict[str, torch.Tensor]:
    """The state dict ``RefStableUNet`` saves, in its order: main UNet, ref_encoder,
    ref_decoder, ref_middle, then (with ``ori_copies``) ori_encoder/ori_decoder/ori_middle
    as separate clones of the main parts, as the released file stores them."""
    main_sd = {k: v.detach() for k, v in main.state_dict().items()}
    ref_sd = reference.state_dict()
    sd = dict(main_sd)
    for part in ("encoder", "decoder", "middle"):
        sd.update({f"ref_{k}": v.detach() for k, v in ref_sd.items() if k.startswith(part + ".")})
    if ori_copies:
        for part in ("encoder", "decoder", "middle"):
            sd.update({f"ori_{k}": v.clone() for k, v in main_sd.items() if k.startswith(part + ".")})
    return sd


def tiny_official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small FlashFace checkpoint (dim 32, context 64, 8 heads) with random values."""
    return official_state_dict(*official_flashface_modules(**TINY, seed=seed))


def full_official_state_dict_meta() -> dict[str, torch.Tensor]:
    """The released model's key set and shapes, on the meta device (no memory). Without the
    ori_* copies: their values cannot be compared on meta."""
    return official_state_dict(*official_flashface_modules(**FULL, device="meta"), ori_copies=False)


def flashface_dir() -> Path:
    return CACHE / "models" / "flashface"


def write_tiny_checkpoints(seed: int = 0) -> dict[str, Path]:
    """The tiny checkpoint as ``.ckpt`` (torch.save) and ``.safetensors``, written once into
    CACHE/models/flashface; returns {"ckpt": path, "safetensors": path}."""
    from safetensors.torch import save_file
    folder = flashface_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {ext: folder / f"flashface-tiny-v{FIXTURE_VERSION}-s{seed}.{ext}" for ext in ("ckpt", "safetensors")}
    if all(p.is_file() for p in paths.values()):
        return paths
    sd = tiny_official_state_dict(seed)
    for ext, path in paths.items():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        if ext == "ckpt":
            torch.save(sd, tmp)
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        os.replace(tmp, path)
    return paths


def write_tiny_checkpoint_for_sd15_clip(seed: int = 0, suffix: str = ".safetensors") -> Path:
    """A small FlashFace checkpoint (UNet width 32) whose cross-attention takes CLIP-L's
    768-wide text features, so it samples with the full-size random SD1.5 checkpoint's CLIP and
    VAE in end-to-end workflows. Written once into CACHE/models/flashface as ``.safetensors`` or,
    with ``suffix=".ckpt"``, as the release's format (torch.save)."""
    from safetensors.torch import save_file
    path = flashface_dir() / f"flashface-tiny-clip768-v{FIXTURE_VERSION}-s{seed}{suffix}"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = official_state_dict(*official_flashface_modules(dim=TINY["dim"], context_dim=FULL["context_dim"],
                                                         num_heads=FULL["num_heads"], seed=seed))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if suffix == ".ckpt":
        torch.save(sd, tmp)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    os.replace(tmp, path)
    return path
