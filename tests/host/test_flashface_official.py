"""The trained mode end to end against the official FlashFace forward (in process, CPU).

IDFusion's FlashFace MODEL (the checkpoint loaded by the ReferenceNet loader into ComfyUI's
own UNet, patched by the Reference Attention node, run through ``BaseModel.apply_model`` with
what a sampler adds to ``transformer_options``) must compute what the official
``RefStableUNet`` computes: the test-side re-implementation in
``idf_testlib/flashface_official.py``, running modules that hold the same checkpoint file's
tensors read by their official names (so IDFusion's key mapping is not trusted here).

At one sigma: ComfyUI's denoised output gives eps = (x − denoised)/σ; the official model gets
x_t = x/√(σ²+1) (ComfyUI's EPS input scaling, i.e. the VP x_t) and t = the discrete timestep
of σ, exactly as its DDIM loop would.

Tolerances (max abs error over the output, relative to the largest |eps|):
- TIGHT, 1e-5: against the official modules with ComfyUI's GroupNorm eps (1e-5 in residual
  blocks and the output head, where the official UNet uses 1e-6; see
  ``with_comfy_groupnorm_eps``). What remains is float32 rounding: different attention
  kernels (ComfyUI's, IDFusion's log-sum-exp merge, ``F.scaled_dot_product_attention``),
  summation orders, and eps recovered from denoised. Observed ≤ 2.0e-6 (≤ 4.1e-6 absolute).
- OFFICIAL, 1e-4: against the official modules unchanged. The GroupNorm eps difference alone
  moves eps by ~3.5e-5 of its scale on these random weights (observed ≤ 3.5e-5, ≤ 7.4e-5
  absolute).
Each case also checks that what it tests moves the output by far more than the tolerance.
"""
import pytest
import torch

from idf_testlib import flashface_fixtures as fx
from idf_testlib import flashface_official as fo

AUTO = "auto (FlashFace: decoder)"
MIX = "mix (weights)"
TIGHT = 1e-5
OFFICIAL = 1e-4
#: How far above the tight tolerance the effect under test must be.
SIGNAL = 1000
TIMESTEP = 500
LATENT = 16          # main latent 16×16 (a 128×128 image)
REF_LATENT = 12      # reference latents 12×12: the decoder's upsampling meets odd sizes (12→6→3→2)
TOKENS = 77


@pytest.fixture(scope="module")
def data(flashface):
    gen = torch.Generator().manual_seed(11)
    width = fx.TINY["context_dim"]
    ms = flashface[0].model.model_sampling
    sigma = float(ms.sigma(torch.tensor(float(TIMESTEP))))
    return {
        "sigma": sigma,
        "x": torch.randn(1, 4, LATENT, LATENT, generator=gen) * sigma,   # the sampler's x at sigma
        "text": torch.randn(1, TOKENS, width, generator=gen),
        "negative": torch.randn(1, TOKENS, width, generator=gen),
        "null": torch.randn(1, TOKENS, width, generator=gen),            # the reference pass's context
        "refs": torch.randn(4, 4, REF_LATENT, REF_LATENT, generator=gen),
    }


# --- the two sides ----------------------------------------------------------------------------

def patched(flashface, data, strength, count=4, position_mask=None):
    from IDFusion.models.references import ReferenceFeatures, ReferenceIdentity
    from IDFusion.nodes.reference import ReferenceAttention
    model, refnet = flashface
    ident = ReferenceIdentity("face", data["refs"][:count], data["null"])
    features = ReferenceFeatures(refnet, (ident,), (1.0,))
    return ReferenceAttention.execute(model, features, strength, 0.0, 1.0, AUTO, MIX, "all",
                                      position_mask=position_mask).result[0]


def comfy_eps(model, data, contexts, cond_or_uncond, guidance=None):
    """eps of ComfyUI's apply_model, called as calc_cond_batch calls it (rows cond-major, the
    MODEL's wrappers and options prepared as a sampler prepares them)."""
    import comfy.model_patcher
    import comfy.sampler_helpers
    from IDFusion.models.engine import GUIDANCE
    options = comfy.model_patcher.create_model_options_clone(model.model_options)
    comfy.sampler_helpers.prepare_model_patcher(model, {}, options)
    rows = contexts.shape[0]
    sigma = torch.full((rows,), data["sigma"])
    transformer_options = dict(options["transformer_options"])
    transformer_options.update(cond_or_uncond=list(cond_or_uncond), uuids=[None] * len(cond_or_uncond),
                               sigmas=sigma)
    if guidance is not None:
        transformer_options[GUIDANCE] = guidance
    x = data["x"].expand(rows, -1, -1, -1)
    denoised = model.model.apply_model(x, sigma, c_crossattn=contexts, transformer_options=transformer_options)
    return (x - denoised) / data["sigma"]


def official_eps(modules, flashface, data, contexts, similarity, count=4, pixel_mask=None, extra_attention=True):
    """The official forward on the same call: x_t, t, the face mask channel as the official demo
    makes it (the pixel mask, every 8th pixel)."""
    ms = flashface[0].model.model_sampling
    rows = contexts.shape[0]
    sigma = torch.full((rows,), data["sigma"])
    x_t = ms.calculate_input(sigma, data["x"].expand(rows, -1, -1, -1))
    t = ms.timestep(sigma).float()
    assert t.tolist() == [TIMESTEP] * rows
    mask = torch.zeros(LATENT, LATENT) if pixel_mask is None else pixel_mask[::8, ::8]
    return fo.ref_stable_unet_forward(*modules, x_t, mask.expand(rows, 1, -1, -1), t, contexts,
                                      data["refs"][:count], data["null"], similarity, extra_attention=extra_attention)


def err(a, b) -> float:
    return float((a - b).abs().max())


def check(got, official, flashface, data, contexts, similarity, **kw):
    """got ≈ the official forward: tightly with ComfyUI's GroupNorm eps, and within OFFICIAL
    unchanged. Returns the comfy-eps official output and the error against it."""
    want = official_eps(official["comfy_eps"], flashface, data, contexts, similarity, **kw)
    scale = float(want.abs().max())
    tight = err(got, want)
    assert tight <= TIGHT * scale, f"max error {tight:.3g} > {TIGHT * scale:.3g} (ComfyUI GroupNorm eps)"
    exact = official_eps(official["official"], flashface, data, contexts, similarity, **kw)
    loose = err(got, exact)
    assert loose <= OFFICIAL * scale, f"max error {loose:.3g} > {OFFICIAL * scale:.3g} (official GroupNorm eps)"
    print(f"scale {scale:.3g}: max error {tight:.3g} (comfy eps), {loose:.3g} (official eps)")
    return want, TIGHT * scale


def two_way(data):
    """The official call before face guidance launches: [text, negative] (num_diff_condition 2)."""
    return torch.cat([data["text"], data["negative"]])


# --- the cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("strength,count", [(0.85, 1), (0.85, 4), (1.2, 4)])
def test_reference_attention_equals_the_official_forward(official, flashface, data, strength, count):
    contexts = two_way(data)
    similarity = fo.official_similarity(strength, 2)
    got = comfy_eps(patched(flashface, data, strength, count), data, contexts, [0, 1])
    want, tol = check(got, official, flashface, data, contexts, similarity, count=count)
    no_ref = official_eps(official["comfy_eps"], flashface, data, contexts, torch.zeros(2), count=count)
    assert err(want, no_ref) > SIGNAL * tol


def test_strength_zero_still_adds_the_extra_attention(official, flashface, data):
    """λ = 0: x += A′(y, y), as the official model with similarity 0; not the plain UNet."""
    contexts = two_way(data)
    got = comfy_eps(patched(flashface, data, 0.0), data, contexts, [0, 1])
    want, tol = check(got, official, flashface, data, contexts, torch.zeros(2))
    plain = official_eps(official["comfy_eps"], flashface, data, contexts, torch.zeros(2), extra_attention=False)
    assert err(got, plain) > SIGNAL * tol
    # ... and it is exactly the loader's MODEL without the Reference Attention node.
    assert torch.equal(got, comfy_eps(flashface[0], data, contexts, [0, 1]))


def test_face_position_mask_feeds_the_fifth_channel_as_the_official_demo(official, flashface, data):
    """A face box whose edges fall inside 8-pixel cells (rows 21–65, columns 37–81): the
    official channel is mask[::8, ::8]."""
    contexts = two_way(data)
    similarity = fo.official_similarity(0.85, 2)
    mask = torch.zeros(LATENT * 8, LATENT * 8)
    mask[21:21 + 45, 37:37 + 45] = 1.0
    got = comfy_eps(patched(flashface, data, 0.85, position_mask=mask), data, contexts, [0, 1])
    _, tol = check(got, official, flashface, data, contexts, similarity, pixel_mask=mask)

    # An all-zero mask is no constraint: exactly the MODEL without a mask, itself checked above.
    got_zero = comfy_eps(patched(flashface, data, 0.85, position_mask=torch.zeros_like(mask)), data, contexts, [0, 1])
    assert torch.equal(got_zero, comfy_eps(patched(flashface, data, 0.85), data, contexts, [0, 1]))
    assert err(got, got_zero) > SIGNAL * tol


def test_three_way_guidance_rows_match_the_official_three_condition_branch(official, flashface, data):
    """[text+ref, text, negative] in one call, the reference on cond 0 only (the guider's
    mechanism): the official num_diff_condition == 3 branch, similarity [λ, 0, 0]."""
    from IDFusion.models.engine import Guidance
    contexts = torch.cat([data["text"], data["text"], data["negative"]])
    similarity = fo.official_similarity(0.85, 3)
    got = comfy_eps(patched(flashface, data, 0.85), data, contexts, [0, 1, 2],
                    guidance=Guidance(ref_conds=frozenset({0})))
    want, tol = check(got, official, flashface, data, contexts, similarity)
    # Rows 0 and 1 differ only by the reference; that difference is what face guidance scales.
    assert err(want[0], want[1]) > SIGNAL * tol
