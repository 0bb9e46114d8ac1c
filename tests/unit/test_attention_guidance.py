"""attention.guidance: FlashFace's three-way guidance (eq. 3), CFG rescale, ε ↔ x0 conversion."""
import pytest
import torch

from IDFusion.attention.guidance import from_eps, rescale, three_way, to_eps, two_way

TOL = dict(rtol=1e-12, atol=1e-12)
RESCALE_TOL = dict(rtol=1e-9, atol=1e-9)     # std(guided) + 1e-12 in the denominator


def randn(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def branches():
    """ε_none, ε_text, ε_text+ref for a batch of 3 latents."""
    return randn(3, 4, 5, 7, seed=0), randn(3, 4, 5, 7, seed=1), randn(3, 4, 5, 7, seed=2)


def test_three_way_by_hand():
    # Y = Y_none + λ_text·(Y_text − Y_none) + λ_ref·(Y_text&ref − Y_text), paper defaults 7.5 and 2
    none, text, text_ref = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), torch.tensor([4.0, 1.5])
    want = torch.tensor([1 + 7.5 * (3 - 1) + 2 * (4 - 3), -2 + 7.5 * (0 + 2) + 2 * (1.5 - 0)])
    assert torch.equal(three_way(none, text, text_ref, 7.5, 2.0), want)


@pytest.mark.parametrize("s_text,s_ref", [(7.5, 2.0), (3.0, 0.5), (1.0, 1.0), (0.0, 0.0)])
def test_three_way_is_flashface_eq_3(s_text, s_ref):
    none, text, text_ref = branches()
    want = none + s_text * (text - none) + s_ref * (text_ref - text)
    torch.testing.assert_close(three_way(none, text, text_ref, s_text, s_ref), want, **TOL)


def test_three_way_unit_scales_give_the_text_and_reference_branch():
    none, text, text_ref = branches()
    torch.testing.assert_close(three_way(none, text, text_ref, 1.0, 1.0), text_ref, **TOL)
    torch.testing.assert_close(three_way(none, text, text_ref, 0.0, 0.0), none, **TOL)


@pytest.mark.parametrize("s_text", [1.0, 4.0, 7.5])
def test_three_way_without_reference_guidance_is_two_way_cfg(s_text):
    none, text, text_ref = branches()
    two = two_way(none, text, s_text)
    assert torch.equal(three_way(none, text, text_ref, s_text, 0.0), two)
    torch.testing.assert_close(two, none + s_text * (text - none), **TOL)


def test_rescale_with_phi_zero_is_the_identity():
    guided, reference = randn(3, 4, 5, 7, seed=3, scale=4.0), randn(3, 4, 5, 7, seed=4)
    assert torch.equal(rescale(guided, reference, 0.0), guided)


def per_sample_std(t):
    return t.flatten(1).std(dim=1)


def test_rescale_with_phi_one_matches_the_references_std_per_sample():
    scales = torch.tensor([0.5, 3.0, 10.0], dtype=torch.float64).view(3, 1, 1, 1)
    guided = randn(3, 4, 5, 7, seed=5) * scales
    reference = randn(3, 4, 5, 7, seed=6) * scales.flip(0)
    out = rescale(guided, reference, 1.0)
    torch.testing.assert_close(per_sample_std(out), per_sample_std(reference), **RESCALE_TOL)
    # a positive multiple of the guided prediction, sample by sample
    ratio = per_sample_std(reference) / per_sample_std(guided)
    torch.testing.assert_close(out, guided * ratio.view(3, 1, 1, 1), **RESCALE_TOL)


@pytest.mark.parametrize("phi", [0.25, 0.5, 0.7])
def test_rescale_interpolates_the_std_linearly_in_phi(phi):
    guided = randn(2, 4, 6, 6, seed=7, scale=5.0)
    reference = randn(2, 4, 6, 6, seed=8)
    out = rescale(guided, reference, phi)
    want = phi * per_sample_std(reference) + (1 - phi) * per_sample_std(guided)
    torch.testing.assert_close(per_sample_std(out), want, **RESCALE_TOL)


def test_eps_and_denoised_round_trip_with_a_sigma_per_sample():
    x = randn(3, 4, 5, 7, seed=9, scale=8.0)
    denoised = randn(3, 4, 5, 7, seed=10)
    sigma = torch.tensor([14.6, 1.0, 0.03], dtype=torch.float64)
    eps = to_eps(x, denoised, sigma)
    torch.testing.assert_close(from_eps(x, eps, sigma), denoised, **TOL)
    torch.testing.assert_close(to_eps(x, from_eps(x, eps, sigma), sigma), eps, rtol=1e-9, atol=1e-9)


def test_to_eps_recovers_the_noise_that_made_x():
    # x = x0 + σ·ε: the noise prediction of the exact x0 is ε
    x0, noise = randn(2, 4, 3, 3, seed=11), randn(2, 4, 3, 3, seed=12)
    sigma = torch.tensor([2.5, 0.4], dtype=torch.float64)
    x = x0 + sigma.view(2, 1, 1, 1) * noise
    torch.testing.assert_close(to_eps(x, x0, sigma), noise, **TOL)
