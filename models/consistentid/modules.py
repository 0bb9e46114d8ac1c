"""ConsistentID's trained networks, built from the shapes of a released checkpoint.

- ``IDProjection`` (the checkpoint's ``image_proj``, IP-Adapter FaceID-Plus): an ArcFace
  embedding [512] and CLIP penultimate states [257, W] → ID tokens [T, C] (T = 4).
- ``FacialEncoder``: ``visual_projection`` (a perceiver with one learned latent) turns a facial
  region's CLIP states into one vector [C]; ``fuse_module`` merges a text hidden state with it.

Perceiver heads are 64 wide as in the official code (heads = inner width / 64); depths, widths
and the token count are read from the weights, so the SD1.5 (C = 768) and SDXL (C = 2048)
releases and small test checkpoints in the same layout all build.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64


class PerceiverAttention(nn.Module):
    """Latents attend to ``[x; latents]`` (both layer-normed), no biases."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.heads = inner // HEAD_DIM
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] features, latents: [B, L, D] → [B, L, D]."""
        x, latents = self.norm1(x), self.norm2(latents)
        b, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, length, -1))


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(),
                         nn.Linear(hidden, dim, bias=False))


class Resampler(nn.Module):
    """proj_in, ``depth`` × (perceiver attention, feed-forward) on the latents, proj_out, norm_out."""

    def __init__(self, embedding_dim: int, dim: int, output_dim: int, depth: int, inner: int, ff_hidden: int):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, inner), feed_forward(dim, ff_hidden)])
                                    for _ in range(depth))

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """latents: [B, L, dim], x: [B, N, embedding_dim] → [B, L, output_dim]."""
        x = self.proj_in(x)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class VisualProjection(Resampler):
    """The FacialEncoder's perceiver: one learned latent per input sequence."""

    def __init__(self, embedding_dim: int, dim: int, output_dim: int, depth: int, inner: int, ff_hidden: int):
        super().__init__(embedding_dim, dim, output_dim, depth, inner, ff_hidden)
        self.latents = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, embedding_dim] → [B, output_dim]."""
        return super().forward(self.latents.expand(x.shape[0], -1, -1), x)[:, 0]


class IDProjection(nn.Module):
    """FaceID-Plus projection: x = LN(reshape(MLP(arcface))) as latents of a perceiver over CLIP states."""

    def __init__(self, id_dim: int, hidden: int, width: int, tokens: int, resampler: Resampler):
        super().__init__()
        self.width, self.tokens = width, tokens
        self.proj = nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(), nn.Linear(hidden, width * tokens))
        self.norm = nn.LayerNorm(width)
        self.perceiver_resampler = resampler

    def forward(self, arcface: torch.Tensor, clip_states: torch.Tensor, shortcut: bool = False,
                scale: float = 1.0) -> torch.Tensor:
        """arcface: [B, 512], clip_states: [B, N, W] → ID tokens [B, T, C]."""
        x = self.norm(self.proj(arcface).reshape(-1, self.tokens, self.width))
        out = self.perceiver_resampler(x, clip_states)
        return x + scale * out if shortcut else out


class MLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int, residual: bool):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class FuseModule(nn.Module):
    """h ← LN(y + MLP2(y)) with y = MLP1([h; f]) + h, for text rows h [N, C] and region vectors f [N, C]."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp1 = MLP(width * 2, width, width, residual=False)
        self.mlp2 = MLP(width, width, width, residual=True)
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, hidden: torch.Tensor, facial: torch.Tensor) -> torch.Tensor:
        y = self.mlp1(torch.cat([hidden, facial.to(hidden.dtype)], dim=-1)) + hidden
        return self.layer_norm(self.mlp2(y))


class FacialEncoder(nn.Module):
    def __init__(self, visual_projection: VisualProjection, width: int):
        super().__init__()
        self.visual_projection = visual_projection
        self.fuse_module = FuseModule(width)


# --- built from a state dict -----------------------------------------------------------------

def _depth(sd: dict, prefix: str) -> int:
    layers = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(layers) + 1 if layers else 0


def _resampler_shapes(sd: dict, prefix: str) -> dict:
    layer = f"{prefix}layers.0."
    return dict(embedding_dim=sd[f"{prefix}proj_in.weight"].shape[1], dim=sd[f"{prefix}proj_in.weight"].shape[0],
                output_dim=sd[f"{prefix}proj_out.weight"].shape[0], depth=_depth(sd, f"{prefix}layers."),
                inner=sd[f"{layer}0.to_q.weight"].shape[0], ff_hidden=sd[f"{layer}1.1.weight"].shape[0])


def build_id_projection(sd: dict) -> IDProjection:
    """An IDProjection shaped like ``sd`` (the ``image_proj`` group), weights loaded strictly."""
    width = sd["norm.weight"].shape[0]
    resampler = Resampler(**_resampler_shapes(sd, "perceiver_resampler."))
    module = IDProjection(sd["proj.0.weight"].shape[1], sd["proj.0.weight"].shape[0], width,
                          sd["proj.2.weight"].shape[0] // width, resampler)
    module.load_state_dict(sd, strict=True)
    return module


def build_facial_encoder(sd: dict) -> FacialEncoder:
    """A FacialEncoder shaped like ``sd`` (the ``FacialEncoder`` group), weights loaded strictly."""
    projection = VisualProjection(**_resampler_shapes(sd, "visual_projection."))
    module = FacialEncoder(projection, sd["fuse_module.layer_norm.weight"].shape[0])
    module.load_state_dict(sd, strict=True)
    return module
