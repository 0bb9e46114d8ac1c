"""Helpers for engine tests on the tiny in-process UNets: random references, conditioning,
sampling with the host's own samplers, identity masks, measured attention probabilities."""
import contextlib
import functools

import torch

from .models import SD15_TINY


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def context(seed: int, width: int = SD15_TINY["context_dim"], tokens: int = 77) -> torch.Tensor:
    return torch.randn(1, tokens, width, generator=gen(seed))


def conditioning(seed: int, width: int = SD15_TINY["context_dim"]):
    """A CONDITIONING value as CLIPTextEncode makes it."""
    return [[context(seed, width), {}]]


def identity(seed: int, count: int = 2, latent: int = 8, label: str = "id", width: int = SD15_TINY["context_dim"]):
    """A ReferenceIdentity with random clean latents [count, 4, latent, latent] and a random null context."""
    from IDFusion.models.references import ReferenceIdentity
    return ReferenceIdentity(label, torch.randn(count, 4, latent, latent, generator=gen(seed)),
                             context(seed + 1000, width))


def training_free_features(model, *idents, weights=None):
    from IDFusion.models.references import TRAINING_FREE, ReferenceFeatures, ReferenceNet
    refnet = ReferenceNet(TRAINING_FREE, "training-free", model_patcher=model)
    return ReferenceFeatures(refnet, tuple(idents), tuple(weights or [1.0] * len(idents)))


def sample(model, seed: int = 0, steps: int = 3, cfg: float = 5.0, size: int | None = 16, batch: int = 1,
           positive=None, negative=None, sampler: str = "euler", latent_hw: tuple[int, int] | None = None):
    """KSampler-equivalent sampling (comfy.sample.sample) of a [batch, 4, size, size] latent
    (or [batch, 4, *latent_hw])."""
    import comfy.sample
    latent = torch.zeros(batch, 4, *(latent_hw or (size, size)))
    noise = torch.randn(latent.shape, generator=gen(seed))
    positive = positive if positive is not None else conditioning(5)
    negative = negative if negative is not None else [[torch.zeros_like(positive[0][0]), {}]]
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


SIGMA = 5.0  # below sigma_max, so the input is noise·σ (no max-denoise scaling)


def noisy_input(seed: int = 0, size: int = 16, sigma: float = SIGMA) -> torch.Tensor:
    """The x the sampler feeds the model at ``sigma`` in ``denoised_once``."""
    return torch.randn(1, 4, size, size, generator=gen(seed)) * sigma


def denoised_once(guider, seed: int = 0, size: int = 16, sigma: float = SIGMA):
    """The guider's denoised prediction at one sigma, in the model's latent space: one Euler step
    to sigma 0 returns it exactly up to rounding (x + (x − d)/σ·(0 − σ) = d)."""
    import comfy.samplers
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(latent.shape, generator=gen(seed))
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = torch.tensor([sigma, 0.0])
    out = guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=seed)
    return guider.model_patcher.model.process_latent_in(out)   # sample() returns the latent scaled out


def plain_guider(model, positive, negative=None, cfg: float = 1.0):
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else positive)
    guider.set_cfg(cfg)
    return guider


def id_masks(masks):
    from IDFusion.models.masks import IdentityMasks
    return IdentityMasks(masks, tuple(f"id{i}" for i in range(masks.shape[0])))


def halves(height, width):
    masks = torch.zeros(2, height, width)
    masks[0, :, : width // 2] = 1
    masks[1, :, width // 2:] = 1
    return masks


class AttentionRecorder:
    """Records the probabilities of every masked attention the real blocks make (the fused-KV
    cross-attentions: routing always needs a mask), by wrapping the host's masked attention
    function in place (``functools.wraps``: the pack still sees which backend it is)."""

    def __init__(self):
        self.calls = []

    def record(self, q, k, mask, heads, to):
        b, lq, c = q.shape
        d = c // heads
        qh = q.view(b, lq, heads, d).transpose(1, 2)
        kh = k.view(b, -1, heads, d).transpose(1, 2)
        scores = qh @ kh.transpose(-1, -2) / d ** 0.5 + (mask if mask.ndim == 4 else mask.unsqueeze(1))
        self.calls.append((tuple(to["block"]), list(to.get("cond_or_uncond", [])), lq, torch.softmax(scores, dim=-1)))

    @contextlib.contextmanager
    def installed(self):
        from comfy.ldm.modules import attention as host
        original = host.optimized_attention_masked

        @functools.wraps(original)
        def recording(q, k, v, heads, mask=None, **kwargs):
            to = kwargs.get("transformer_options") or {}
            if mask is not None and to.get("block") is not None:
                self.record(q, k, mask, heads, to)
            return original(q, k, v, heads, mask=mask, **kwargs)
        host.optimized_attention_masked = recording
        try:
            yield self
        finally:
            host.optimized_attention_masked = original
