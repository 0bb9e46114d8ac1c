"""The delayed merge: the text-only prompt up to the merge step, the facial prompt after.

The official loop runs step i (0-based) with the text-only prompt while ``i <= start_merge_step``
(30 of 50) and with the facial one after. Here the merge step is a fraction of the schedule:
``k = round(fraction · N)`` for N sampling steps (0.6 · 50 = 30, the official step).

The positive CONDITIONING holds both prompts, marked with ``MERGE``. The Apply node's wrapper
around the guider's ``outer_sample`` sees the sampler's sigmas and gives the two conds sigma
ranges that meet strictly between σ_k and σ_{k+1}: exact for any sampler, scheduler and step
count. Without that wrapper the marks' ``start_percent``/``end_percent`` (the fraction as
sampling progress) still switch them, approximately.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MERGE = "idfusion_consistentid_merge"
TEXT_ONLY = "text-only"
FACIAL = "facial"
WRAPPER_KEY = "idfusion_consistentid"


@dataclass(frozen=True)
class MergePoint:
    fraction: float
    phase: str


def merge_step(fraction: float, steps: int) -> int:
    """The last step (0-based) of the text-only prompt: round(fraction · steps)."""
    return int(math.floor(fraction * steps + 0.5))


def boundary(sigmas: torch.Tensor, fraction: float) -> float:
    """A sigma strictly between σ_k and σ_{k+1}; −1 when the text-only prompt runs every step."""
    steps = len(sigmas) - 1
    k = merge_step(fraction, steps)
    if k >= steps - 1:
        return -1.0
    return float(sigmas[k] + sigmas[k + 1]) / 2


def retime(cond: dict, sigmas: torch.Tensor) -> dict:
    """A marked cond with exact sigma bounds for this schedule instead of its percent fallback."""
    point = cond.get(MERGE)
    if point is None:
        return cond
    out = {k: v for k, v in cond.items() if k not in ("start_percent", "end_percent", "timestep_start",
                                                       "timestep_end")}
    edge = boundary(sigmas, point.fraction)
    if point.phase == TEXT_ONLY:
        out["timestep_end"] = edge           # active while sigma >= edge
    else:
        out["timestep_start"] = edge         # active while sigma <= edge
    return out


def conditioning(text_only: torch.Tensor, facial: torch.Tensor, pooled, fraction: float) -> list:
    """The positive CONDITIONING: both prompts, marked for the merge."""
    def entry(phase: str, start: float, end: float) -> dict:
        extra = {MERGE: MergePoint(fraction, phase), "start_percent": start, "end_percent": end}
        return extra if pooled is None else {"pooled_output": pooled, **extra}
    return [[text_only, entry(TEXT_ONLY, 0.0, fraction)], [facial, entry(FACIAL, fraction, 1.0)]]


def merge_wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """``WrappersMP.OUTER_SAMPLE`` wrapper (key ``WRAPPER_KEY``): retime the guider's marked conds."""
    guider = executor.class_obj
    guider.conds = {name: [retime(c, sigmas) for c in conds] for name, conds in guider.conds.items()}
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
