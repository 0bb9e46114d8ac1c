"""FlashFace's three-way guidance (eq. 3) and CFG rescale, on noise predictions.

    ε = ε_none + s_text·(ε_text − ε_none) + s_ref·(ε_text+ref − ε_text)

then rescaled against the text branch (arXiv:2305.08891, as the official code does with
φ = 0.5): ``ε ← ε·(φ·std(ε_text)/std(ε) + 1 − φ)``, std per sample.
"""
from __future__ import annotations

import torch


def three_way(none: torch.Tensor, text: torch.Tensor, text_ref: torch.Tensor,
              s_text: float, s_ref: float) -> torch.Tensor:
    return none + s_text * (text - none) + s_ref * (text_ref - text)


def two_way(none: torch.Tensor, text: torch.Tensor, s_text: float) -> torch.Tensor:
    return none + s_text * (text - none)


def rescale(guided: torch.Tensor, reference: torch.Tensor, phi: float) -> torch.Tensor:
    """Pull the per-sample std of ``guided`` towards that of ``reference`` by φ ∈ [0, 1]."""
    if phi == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    ratio = reference.std(dim=dims, keepdim=True) / (guided.std(dim=dims, keepdim=True) + 1e-12)
    return guided * (phi * ratio + (1.0 - phi))


def to_eps(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ComfyUI's denoised prediction → noise prediction: ε = (x − x0) / σ."""
    return (x - denoised) / sigma.view(-1, *([1] * (x.ndim - 1)))


def from_eps(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x - eps * sigma.view(-1, *([1] * (x.ndim - 1)))
