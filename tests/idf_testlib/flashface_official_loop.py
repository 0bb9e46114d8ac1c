"""The official FlashFace inference loop, re-implemented on the test side.

Written from ali-vilab/FlashFace: ``flashface/all_finetune/demo_gradio.py`` (``generate``:
padding to four references, the face position mask, the encoded negative prompt as the
reference context), ``flashface/all_finetune/ops/context_diffusion.py``
(``ContextGaussianDiffusion.denoise``: the launch step, two- and three-branch guidance, CFG
rescale), ``ldm/ops/diffusion.py`` (``GaussianDiffusion.sample``: 'trailing' timesteps,
``_t_to_sigma``/``_sigma_to_t``), ``ldm/ops/solvers.py`` (``sample_ddim``), ``ldm/ops/
schedules.py`` (the scaled-linear schedule) and ``flashface/all_finetune/config.py``. The UNet
is :func:`flashface_official.ref_stable_unet_forward`. Nothing here imports IDFusion.

Sigmas are the official VP ones (``σ² + α² = 1``); the sampler's x is the VP x_t. The one
deliberate difference: the official demo pads fewer than four references with
``random.choice``; here they are repeated in turn (r1, r2, r3, r1), the deterministic
padding IDFusion reproduces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .flashface_official import official_similarity, ref_stable_unet_forward

#: config.py
NUM_TIMESTEPS = 1000
BETA_MIN, BETA_MAX = 0.00085, 0.0120
AE_SCALE = 0.18215
NUM_PAIRS = 4


def scaled_linear_sigmas(n: int = NUM_TIMESTEPS, beta_min: float = BETA_MIN,
                         beta_max: float = BETA_MAX) -> torch.Tensor:
    """``noise_schedule('scaled_linear')``: VP sigmas [n], float64."""
    betas = torch.linspace(beta_min ** 0.5, beta_max ** 0.5, n, dtype=torch.float64) ** 2
    return torch.sqrt(1 - torch.cumprod(1 - betas, dim=0))


def vp_to_ve(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.where(sigmas < 1.0, (sigmas ** 2 / (1 - sigmas ** 2)) ** 0.5, float("inf"))


def ve_to_vp(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.where(sigmas < float("inf"), (sigmas ** 2 / (1 + sigmas ** 2)) ** 0.5, 1.0)


def trailing_timesteps(steps: int, t_max: int = NUM_TIMESTEPS - 1, t_min: int = 0) -> torch.Tensor:
    """``discretization='trailing'``: 999, 959, …, 39 for 25 steps (float32)."""
    t = torch.arange(t_max, t_min - 1, -((t_max - t_min + 1) / steps))
    return t.clamp_(t_min, t_max).to(torch.float32)


def t_to_sigma(schedule: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``GaussianDiffusion._t_to_sigma``: interpolation in log VE sigma (float32)."""
    t = t.float()
    i, j, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigmas = vp_to_ve(schedule).log().to(t)
    log_sigma = (1 - w) * log_sigmas[i] + w * log_sigmas[j]
    log_sigma[torch.isnan(log_sigma) | torch.isinf(log_sigma)] = float("inf")
    return ve_to_vp(log_sigma.exp())


def sigma_to_t(schedule: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``GaussianDiffusion._sigma_to_t`` for one sigma: the (fractional) timestep [1]."""
    if sigma == 1.0:
        return torch.full((1,), float(len(schedule) - 1))
    log_sigmas = vp_to_ve(schedule).log().to(sigma)
    log_sigma = vp_to_ve(sigma).log()
    i = torch.where((log_sigma - log_sigmas).ge(0))[0][-1].clamp(max=len(schedule) - 2).unsqueeze(0)
    j = i + 1
    w = ((log_sigmas[i] - log_sigma) / (log_sigmas[i] - log_sigmas[j])).clamp(0, 1)
    return (1 - w) * i + w * j


def pad_references(refs: torch.Tensor, total: int = NUM_PAIRS) -> torch.Tensor:
    """``generate``: fewer than four references padded to four (here in turn, not at random)."""
    n = refs.shape[0]
    return refs[[i % n for i in range(max(n, total))]]


def demo_position_mask(box, height: int, width: int) -> torch.Tensor:
    """``generate``: the normalised face box to pixels with int(), squared, every 8th pixel: [h, w]."""
    face_bbox = [int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height)]
    max_size = max(face_bbox[2] - face_bbox[0], face_bbox[3] - face_bbox[1])
    empty_mask = torch.zeros((height, width))
    empty_mask[face_bbox[1]:face_bbox[1] + max_size, face_bbox[0]:face_bbox[0] + max_size] = 1
    return empty_mask[::8, ::8]


@dataclass
class Settings:
    """``generate``'s parameters (defaults: the demo's) and ``sample``'s guidance."""

    steps: int = 25
    lamda_feat: float = 1.2
    face_guidence: float = 3.2
    text_control_scale: float = 7.5
    step_to_launch_face_guidence: int = 750
    lamda_feat_before_ref_guidence: float = 0.85
    guide_rescale: float = 0.5


def _rescale(out: torch.Tensor, y_out: torch.Tensor, guide_rescale: float) -> torch.Tensor:
    ratio = (y_out.flatten(1).std(dim=1) / (out.flatten(1).std(dim=1) + 1e-12)).view((-1,) + (1,) * (y_out.ndim - 1))
    return out * (guide_rescale * ratio + (1 - guide_rescale) * 1.0)


class OfficialSampler:
    """``ContextGaussianDiffusion`` with the demo's model (``RefStableUNet`` with its share_cache)."""

    def __init__(self, modules, ref_latents: torch.Tensor, ref_context: torch.Tensor, mask: torch.Tensor,
                 settings: Settings):
        self.main, self.reference = modules
        self.ref = pad_references(ref_latents)               # share_cache['ref']
        self.ref_context = ref_context                       # share_cache['ref_context'] (one row, repeated)
        self.mask = mask                                     # share_cache['masks'] (one sample)
        self.settings = settings
        self.schedule = scaled_linear_sigmas()
        self.alphas = torch.sqrt(1 - self.schedule ** 2)

    def model(self, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor, similarity: torch.Tensor):
        """``RefStableUNet.forward`` for one sample: rows condition by condition."""
        rows = context.shape[0]
        masks = self.mask.expand(rows, 1, -1, -1)
        return ref_stable_unet_forward(self.main, self.reference, xt, masks, t.float().expand(rows), context,
                                       self.ref, self.ref_context, similarity)

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, c: torch.Tensor, nc: torch.Tensor) -> torch.Tensor:
        """``ContextGaussianDiffusion.denoise``: x0 at the integer timestep t."""
        s = self.settings
        sigmas, alphas = self.schedule[t].float(), self.alphas[t].float()
        classifier = s.face_guidence
        if (t > s.step_to_launch_face_guidence).any():
            classifier, similarity = 0, s.lamda_feat_before_ref_guidence
        else:
            similarity = s.lamda_feat
        if classifier > 0:
            raw = self.model(xt.repeat(3, 1, 1, 1), t, torch.cat([c, c, nc]), official_similarity(similarity, 3))
            y_out_with_ref, y_out, u_out = torch.split(raw, raw.size(0) // 3, dim=0)
            out = u_out + s.text_control_scale * (y_out - u_out) + classifier * (y_out_with_ref - y_out)
        else:
            raw = self.model(xt.repeat(2, 1, 1, 1), t, torch.cat([c, nc]), official_similarity(similarity, 2))
            y_out, u_out = torch.split(raw, raw.size(0) // 2, dim=0)
            out = u_out + s.text_control_scale * (y_out - u_out)
        out = _rescale(out, y_out, s.guide_rescale)
        return (xt - sigmas * out) / alphas

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, c: torch.Tensor, nc: torch.Tensor) -> torch.Tensor:
        """``GaussianDiffusion.sample(solver='ddim', discretization='trailing')``: z0 (latent × 0.18215)."""
        sigmas = t_to_sigma(self.schedule, trailing_timesteps(self.settings.steps))
        sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
        x = noise
        for i in range(len(sigmas) - 1):                                          # sample_ddim, eta = 0
            t = sigma_to_t(self.schedule, sigmas[i]).round().long()
            x0 = self.denoise(x, t, c, nc)
            d = (x - (1 - sigmas[i] ** 2) ** 0.5 * x0) / sigmas[i]
            x = (1 - sigmas[i + 1] ** 2) ** 0.5 * x0 + sigmas[i + 1] * d
        return x


def ve_sigmas(schedule: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """The VE sigmas (ComfyUI's parametrisation) of integer timesteps of a VP schedule."""
    return vp_to_ve(schedule[timesteps])


def timesteps_of(steps: int) -> list[int]:
    """The integer timesteps the official model sees for ``steps`` trailing steps."""
    return [int(v) for v in trailing_timesteps(steps).round().long()]
