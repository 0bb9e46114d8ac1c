"""Identity routing is exact whichever attention the host runs: fused-KV routing adds a float
mask with −inf, so routed calls go to the host's masked attention only where it applies masks
exactly (basic, sub-quadratic, split, PyTorch, xformers); with any other backend, or an
attention override set by another node, they use the host's PyTorch attention."""
import pytest
import torch

from idf_testlib import engine as E
from idf_testlib.engine import AttentionRecorder, halves, id_masks

REGION = "by region (identity masks)"


def fused(model, features, **kw):
    from IDFusion.nodes.fusion import FusedKV
    return FusedKV.execute(model, features, 1.0, 0.0, 1.0, "all (input + middle + output)",
                           "training-free (self-attention projections)", kw.pop("mode", "mix (weights)"),
                           kw.pop("outside", "all"), identity_masks=kw.pop("masks", None)).result[0]

#: The host's attention functions that run on the CPU.
CPU_BACKENDS = ("attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch")


@pytest.fixture
def backend(host, monkeypatch):
    """Make one of the host's functions its masked attention, as its start-up flags would."""
    from comfy.ldm.modules import attention as host_attention

    def use(fn):
        monkeypatch.setattr(host_attention, "optimized_attention_masked", fn)
        return fn
    return use


def routed(sd15):
    features = E.training_free_features(sd15, E.identity(1, count=1), E.identity(2, count=2))
    return fused(sd15, features, mode=REGION, outside="none", masks=id_masks(halves(128, 128)))


def assert_isolated(recorder):
    assert recorder.calls
    for _, _, lq, probs in recorder.calls:
        side = int(lq ** 0.5)
        left = (torch.arange(lq) % side) < side // 2
        keys = probs.shape[-1] - 77
        one = 77 + keys // 3                         # identity 1: one reference, identity 2: two
        assert torch.count_nonzero(probs[..., left, one:]) == 0
        assert torch.count_nonzero(probs[..., ~left, 77:one]) == 0


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_every_cpu_backend_routes_exactly_and_agrees(sd15, backend, name):
    from comfy.ldm.modules import attention as host
    patched = routed(sd15)
    backend(host.attention_basic)
    expected = E.sample(patched, steps=2)
    backend(getattr(host, name))
    with AttentionRecorder().installed() as recorder:
        got = E.sample(patched, steps=2)
    assert_isolated(recorder)
    assert_same_up_to_rounding(got, expected)


def assert_same_up_to_rounding(got, expected):
    """Backends sum in different orders: float32 rounding of the latents' scale, no more."""
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))


def mask_dropping(name):
    """A backend that ignores masks, like flash attention or a quantized kernel might."""
    from comfy.ldm.modules import attention as host

    def dropping(q, k, v, heads, mask=None, **kwargs):
        return host.attention_basic(q, k, v, heads, **{k: v for k, v in kwargs.items() if k != "transformer_options"})
    dropping.__name__ = name
    return dropping


def test_a_backend_that_drops_masks_is_not_used_for_routed_calls(sd15, backend):
    from comfy.ldm.modules import attention as host
    patched = routed(sd15)
    backend(host.attention_pytorch)
    expected = E.sample(patched, steps=2)
    backend(mask_dropping("attention_flash"))
    assert torch.equal(E.sample(patched, steps=2), expected)


def test_an_override_from_another_node_does_not_unroute(sd15, backend):
    """Another node's attention override (e.g. a sage-attention patch) that ignores masks."""
    from comfy.ldm.modules import attention as host
    patched = routed(sd15)
    backend(host.attention_pytorch)
    expected = E.sample(patched, steps=2)
    dropping = mask_dropping("sage")
    overridden = patched.clone()
    overridden.model_options["transformer_options"]["optimized_attention_override"] = (
        lambda func, *args, **kwargs: dropping(*args, **kwargs))
    assert_same_up_to_rounding(E.sample(overridden, steps=2), expected)     # unmasked calls: the override's
    unrouted = E.sample(fused(sd15, E.training_free_features(sd15, E.identity(1, count=1), E.identity(2, count=2))),
                        steps=2)
    assert not torch.allclose(expected, unrouted)
