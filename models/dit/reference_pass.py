"""The DiT reference pass: one identity's clean reference latents through the running model,
keeping each wanted block's reference keys and values.

Each reference image runs alone (batch 1) through the host's own model call
(``BaseModel._apply_model``: input scaling, dtypes, timestep, the family's conditioning) at
the pass's sigma — the current one (FlashFace) or 0 (timestep-zero references) — with the
identity's empty-prompt context. One ``attn1_patch`` does two things in every block:

- it moves the image tokens to the reference's place, the position ids the host's reference
  method gives a native reference (``families.reference_offsets``), by replacing the image
  part of the rotary embedding ``pe``;
- at the wanted blocks it keeps the image tokens' keys after the host's qk-norm, rotated at
  those positions (the host's ``apply_rope1``), and their values.

So the keys are ready to join any later call's attention next to its own (already rotated)
keys. Features: ``{((block_type, index, 0), "k" | "v"): [1, H, ΣR, D]}``, all reference
images of the identity in order along the tokens.
"""
from __future__ import annotations

import torch

from .families import Family, latent_size, reference_ids, reference_method, reference_offsets

FeatureKey = tuple[tuple[str, int, int], str]


class _Collector:
    """attn1_patch of a reference pass (see the module docstring)."""

    def __init__(self, ref_pe: torch.Tensor, wanted: set[FeatureKey]):
        self.ref_pe, self.wanted = ref_pe, wanted
        self.features: dict[FeatureKey, torch.Tensor] = {}
        self._pe = (None, None)

    def _placed(self, pe: torch.Tensor, txt: int) -> torch.Tensor:
        if self._pe[0] is not pe:
            self._pe = (pe, torch.cat([pe[:, :, :txt], self.ref_pe.to(device=pe.device, dtype=pe.dtype)], dim=2))
        return self._pe[1]

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        from comfy.ldm.flux.math import apply_rope1

        txt, end = extra_options["img_slice"]
        placed = self._placed(pe, txt)
        block = (extra_options["block_type"], extra_options["block_index"], 0)
        if (block, "k") in self.wanted:
            self.features[(block, "k")] = apply_rope1(k[:, :, txt:end], placed[:, :, txt:end]).contiguous()
            self.features[(block, "v")] = v[:, :, txt:end].contiguous()
        return {"pe": placed}


def _conds(base_model, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None,
           guidance: float | None, device) -> dict:
    """The family's model inputs for the pass, as the host builds them from a conditioning."""
    extra = {"cross_attn": context, "noise": x, "device": device}
    if pooled is not None:
        extra["pooled_output"] = pooled
    if guidance is not None:
        extra["guidance"] = guidance
    built = base_model.extra_conds(**extra)
    return {name: cond.process_cond(batch_size=1, area=None, device=device).cond for name, cond in built.items()}


def reference_pass(base_model, family: Family, latents: torch.Tensor, sigma: float, context: torch.Tensor,
                   pooled: torch.Tensor | None, guidance: float | None, wanted: set[FeatureKey],
                   device) -> dict[FeatureKey, torch.Tensor]:
    """Reference keys/values of every wanted block for ``latents`` [N, C, (T,) h, w] (clean, in the
    model's latent space); context [1, T, D] and pooled [1, P] from the empty prompt."""
    dm = base_model.diffusion_model
    method, scale = reference_method(dm, family)
    places = reference_offsets(method, [latent_size(x) for x in latents], scale)
    per_image = []
    for x, (index, h_offset, w_offset) in zip(latents, places):
        x = x.unsqueeze(0).to(device=device, dtype=torch.float32)
        ids = reference_ids(dm, family, x, index, h_offset, w_offset).to(device)
        collector = _Collector(dm.pe_embedder(ids), wanted)
        conds = _conds(base_model, x, context.to(device), None if pooled is None else pooled.to(device), guidance,
                       device)
        c_crossattn = conds.pop("c_crossattn")
        c_concat = conds.pop("c_concat", None)
        options = {"patches": {"attn1_patch": [collector]}}
        with torch.no_grad():
            base_model._apply_model(x, torch.full((1,), float(sigma), device=device), c_concat, c_crossattn, None,
                                    options, **conds)
        missing = wanted - collector.features.keys()
        if missing:
            raise RuntimeError(f"IDFusion: the DiT reference pass did not reach blocks {sorted(missing)[:4]}")
        per_image.append(collector.features)
    return {key: torch.cat([f[key] for f in per_image], dim=2) for key in wanted}
