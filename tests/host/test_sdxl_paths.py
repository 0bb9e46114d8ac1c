"""Training-free reference attention and fused KV on an SDXL-layout UNet (tiny, random weights),
sampled by the host's own sampler: strength 0 is the original model exactly, a non-zero strength
changes the picture, and the input MODEL is untouched.

The tiny UNet's ADM input is narrower than SDXL's pooled-output + size embedding, so the model's
``encode_adm`` returns a fixed vector of its width (the reference identity carries the same)."""
import pytest
import torch

from idf_testlib import engine as E
from idf_testlib import models

AUTO = "auto (FlashFace: decoder)"
ALL = "all (input + middle + output)"
TRAINING_FREE_ADAPTER = "training-free (self-attention projections)"
MIX = "mix (weights)"
WIDTH = models.SDXL_TINY["context_dim"]


@pytest.fixture(scope="module")
def sdxl(host):
    model = models.tiny_sdxl(seed=4)
    adm = torch.randn(1, model.model.adm_channels, generator=E.gen(7))
    model.model.encode_adm = lambda **kwargs: adm
    return model


@pytest.fixture(scope="module")
def features(sdxl):
    ident = E.identity(1, count=2, width=WIDTH)
    ident = type(ident)(ident.label, ident.latents, ident.context, sdxl.model.encode_adm())
    return E.training_free_features(sdxl, ident)


def reference(model, features, strength):
    from IDFusion.nodes.reference import ReferenceAttention
    return ReferenceAttention.execute(model, features, strength, 0.0, 1.0, AUTO, MIX, "all").result[0]


def fused(model, features, weight):
    from IDFusion.nodes.fusion import FusedKV
    return FusedKV.execute(model, features, weight, 0.0, 1.0, ALL, TRAINING_FREE_ADAPTER, MIX, "all").result[0]


def sample(model):
    return E.sample(model, positive=E.conditioning(5, width=WIDTH))


@pytest.mark.parametrize("patch", [reference, fused])
def test_strength_zero_is_the_original_and_a_strength_changes_the_picture(sdxl, features, patch):
    original = sample(sdxl)
    assert torch.equal(sample(patch(sdxl, features, 0.0)), original)
    patched = sample(patch(sdxl, features, 0.9))
    assert float((patched - original).abs().max()) > 1e-3 * float(original.abs().max())
    assert torch.equal(sample(sdxl), original)
