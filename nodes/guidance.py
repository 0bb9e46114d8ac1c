"""FlashFace's reference guidance as a GUIDER for SamplerCustomAdvanced."""
from __future__ import annotations

import comfy.samplers
from .api import io

from ..attention.guidance import from_eps, rescale, three_way, to_eps, two_way
from ..models.engine import GUIDANCE, Guidance


def with_guidance(model_options: dict, guidance: Guidance) -> dict:
    """A shallow copy of model_options whose transformer_options carry the guidance."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), GUIDANCE: guidance}
    return options


class ReferenceGuiderImpl(comfy.samplers.CFGGuider):
    """``none + s_text·(text − none) + s_ref·(text+ref − text)``, the reference active only in the
    text+ref branch; before the launch timestep, two-way CFG with λ_before on both branches;
    with s_ref = 0, two-way CFG with the MODEL's λ on both branches after it (the official code's
    ``classifier == 0``). All are rescaled against the text branch in noise space (official FlashFace)."""

    def set_settings(self, text_scale: float, reference_scale: float, lambda_before: float,
                     launch_timestep: float, rescale_phi: float):
        self.text_scale = text_scale
        self.reference_scale = reference_scale
        self.lambda_before = lambda_before
        self.launch_timestep = launch_timestep
        self.rescale_phi = rescale_phi

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        t = float(self.inner_model.model_sampling.timestep(timestep.reshape(-1)[:1]).float()[0])
        if t > self.launch_timestep or self.reference_scale == 0:
            strength = self.lambda_before if t > self.launch_timestep else None
            options = with_guidance(model_options, Guidance(ref_conds=None, strength=strength))
            text, none = comfy.samplers.calc_cond_batch(self.inner_model, [positive, negative], x, timestep, options)
            eps_text, eps_none = to_eps(x, text, timestep), to_eps(x, none, timestep)
            guided = two_way(eps_none, eps_text, self.text_scale)
        else:
            options = with_guidance(model_options, Guidance(ref_conds=frozenset({0})))
            text_ref, text, none = comfy.samplers.calc_cond_batch(self.inner_model, [positive, positive, negative],
                                                                  x, timestep, options)
            eps_text, eps_none = to_eps(x, text, timestep), to_eps(x, none, timestep)
            guided = three_way(eps_none, eps_text, to_eps(x, text_ref, timestep), self.text_scale, self.reference_scale)
        denoised = from_eps(x, rescale(guided, eps_text, self.rescale_phi), timestep)
        for fn in model_options.get("sampler_post_cfg_function", []):
            denoised = fn({"denoised": denoised, "cond": positive, "uncond": negative, "cond_scale": self.text_scale,
                           "model": self.inner_model, "uncond_denoised": none, "cond_denoised": text,
                           "sigma": timestep, "model_options": model_options, "input": x})
        return denoised


class ReferenceGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionReferenceGuider",
            display_name="IDFusion Reference Guider",
            category="IDFusion/guidance",
            description="FlashFace's three-way guidance for SamplerCustomAdvanced: none + s_text·(text − none) + "
                        "s_ref·(text+ref − text). The reference is active only in the text+ref branch; before the "
                        "launch timestep, plain CFG with λ_before on both branches (with reference_scale 0: plain "
                        "CFG with the MODEL's λ after it). Needs a MODEL patched by 'IDFusion Reference Attention'. "
                        "FlashFace's sampler: DDIM with the 'simple' scheduler (the official 'trailing' steps).",
            inputs=[
                io.Model.Input("model", tooltip="A MODEL patched by 'IDFusion Reference Attention'."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (the 'none' branch)."),
                io.Float.Input("text_scale", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="s_text, classifier-free guidance on the text (FlashFace: 7.5)."),
                io.Float.Input("reference_scale", default=2.0, min=0.0, max=10.0, step=0.05,
                               tooltip="s_ref, guidance on the reference (paper: 2–2.5; official demo 3.2). 0 = "
                                       "plain CFG with the reference on both branches (as the official code)."),
                io.Float.Input("lambda_before", default=0.85, min=0.0, max=2.0, step=0.01,
                               tooltip="λ_feat on both branches before the launch timestep (official: 0.85)."),
                io.Int.Input("launch_timestep", default=750, min=0, max=1000, step=1,
                             tooltip="Reference guidance starts once the timestep (0–999) is at or below this "
                                     "(official: 750). 1000 = from the first step."),
                io.Float.Input("rescale", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="CFG rescale against the text branch (official: 0.5; 0 = off)."),
            ],
            outputs=[io.Guider.Output(display_name="reference guider", tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, text_scale, reference_scale, lambda_before, launch_timestep,
                rescale) -> io.NodeOutput:
        guider = ReferenceGuiderImpl(model)
        guider.set_conds(positive, negative)
        guider.set_settings(text_scale, reference_scale, lambda_before, launch_timestep, rescale)
        return io.NodeOutput(guider)


NODES = [ReferenceGuider]
