"""Training-free reference attention for DiTs against the real host: tiny Flux.1, Flux.2, Chroma
and Qwen-Image models from the host's classes.

The gold re-implements the method from the host alone: a reference pass of the clean
reference latent through the host's model call, its tokens placed where the host places a
native reference (read from a native call), its keys taken after the host's qk-norm and
rotated there; then every block's attention on the image rows is
``(1−λ)·softmax(q·kᵀ)·v + λ·softmax(q·[k; K_r]ᵀ)·[v; V_r]`` written out in float64."""
import math

import pytest
import torch

from idf_testlib import dit_models as D

pytestmark = pytest.mark.usefixtures("dit_host")

FAMILIES = ["flux", "flux2", "chroma", "qwen_image"]
SIZE = 8
ZERO, CURRENT = "zero (once per run)", "current (FlashFace)"
MIX, REGION = "mix (weights)", "by region (identity masks)"
ALL = "all (double + single)"


@pytest.fixture(scope="module", params=FAMILIES)
def dit(request):
    return D.tiny_dit(request.param, seed=7)


def family(model) -> str:
    return model.model.model_config.unet_config["image_model"]


def identity(model, seed, count=1, size=(6, 6), label="id"):
    from IDFusion.models.references import ReferenceIdentity
    latents = torch.cat([D.latent(model, *size, seed=seed + i) for i in range(count)])
    empty = D.conditioning(seed + 100, pooled=family(model) == "flux")
    return ReferenceIdentity(label, latents, empty[0][0], empty[0][1].get("pooled_output"))


def features(*idents, weights=None):
    from IDFusion.models.references import ReferenceFeatures
    from IDFusion.nodes.dit import dit_reference_net
    return ReferenceFeatures(dit_reference_net(), tuple(idents), tuple(weights or [1.0] * len(idents)))


def patched(model, feats, strength=0.8, timestep=ZERO, mode=MIX, outside="all", masks=None, blocks=ALL,
            start=0.0, end=1.0):
    from IDFusion.nodes.dit import DiTReferenceAttention
    return DiTReferenceAttention.execute(model, feats, strength, start, end, blocks, timestep, mode, outside,
                                         identity_masks=masks).result[0]


def cond(model, seed=4):
    return D.conditioning(seed, pooled=family(model) == "flux")


def passes():
    from IDFusion.models.feature_cache import FEATURE_CACHE
    return FEATURE_CACHE.stats()["reference_passes"]


def stats():
    from IDFusion.models.feature_cache import FEATURE_CACHE
    return FEATURE_CACHE.stats()


# --- equivalences ------------------------------------------------------------------------------

def test_strength_zero_equals_the_original_model(dit):
    feats = features(identity(dit, 1))
    positive = cond(dit)
    assert torch.equal(D.sample(patched(dit, feats, strength=0.0), positive), D.sample(dit, positive))


def test_the_patch_changes_the_result_and_leaves_the_input_model_alone(dit):
    positive = cond(dit)
    before = D.sample(dit, positive)
    out = D.sample(patched(dit, features(identity(dit, 1))), positive)
    assert not torch.allclose(out, before)
    assert torch.equal(D.sample(dit, positive), before)


def test_one_identity_with_a_full_mask_equals_the_unmasked_path(dit):
    from IDFusion.models.masks import IdentityMasks
    feats = features(identity(dit, 1))
    full = IdentityMasks(torch.ones(1, SIZE * 8, SIZE * 8), ("a",))
    positive = cond(dit)
    masked = D.sample(patched(dit, feats, mode=REGION, masks=full), positive)
    assert torch.equal(masked, D.sample(patched(dit, feats), positive))


# --- the gold ----------------------------------------------------------------------------------

def native_reference_pe(model, ref):
    """The rotary embedding the host gives ``ref``'s tokens when it is a native reference (Chroma
    takes none: a tiny Flux.1 with Chroma's rotary axes places it the Flux way)."""
    if family(model) == "chroma":
        model = D.tiny_dit("flux", seed=0)
        ref = ref[:, :16]
    seen = {}

    def capture(q, k, v, pe=None, attn_mask=None, extra_options=None):
        seen.setdefault("pe", pe[:, :, pe.shape[2] - sum(extra_options["reference_image_num_tokens"]):])
        return {}
    x = D.latent(model, SIZE, SIZE, seed=0)
    D.apply(model, x, D.with_references(cond(model), [ref]),
            transformer_options={"patches": {"attn1_patch": [capture]}})
    return seen["pe"]


class GoldPass:
    """attn1_patch of the test's reference pass: keeps each block's rotated reference keys and values."""

    def __init__(self, ref_pe):
        self.ref_pe, self.kv = ref_pe, {}

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        from comfy.ldm.flux.math import apply_rope1
        txt = extra_options["img_slice"][0]
        pe = torch.cat([pe[:, :, :txt], self.ref_pe.to(pe)], dim=2)
        block = (extra_options["block_type"], extra_options["block_index"])
        self.kv[block] = (apply_rope1(k[:, :, txt:], pe[:, :, txt:]), v[:, :, txt:])
        return {"pe": pe}


class GoldBlend:
    """attn1_patch (layout) + attention override: FlashFace's blend on the image rows, in float64."""

    def __init__(self, kv, strength):
        self.kv, self.strength = kv, strength

    def patch(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        self.layout = (extra_options["img_slice"][0], (extra_options["block_type"], extra_options["block_index"]))
        return {}

    def __call__(self, func, q, k, v, heads, mask=None, **kwargs):
        txt, block = self.layout
        k_ref, v_ref = self.kv[block]
        scale = 1 / math.sqrt(q.shape[-1])
        qd, kd, vd = q.double(), k.double(), v.double()
        own = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1) @ vd
        k_all = torch.cat([kd, k_ref.double().expand(q.shape[0], -1, -1, -1)], dim=2)
        v_all = torch.cat([vd, v_ref.double().expand(q.shape[0], -1, -1, -1)], dim=2)
        joint = torch.softmax(qd @ k_all.transpose(-1, -2) * scale, dim=-1) @ v_all
        out = own.clone()
        out[:, :, txt:] = (1 - self.strength) * own[:, :, txt:] + self.strength * joint[:, :, txt:]
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d).to(q.dtype)


@pytest.mark.parametrize("timestep", [ZERO, CURRENT])
def test_equals_a_reimplementation_from_the_host(dit, timestep):
    strength, sigma, guidance = 0.7, 0.6, 3.5
    ident = identity(dit, 2)
    x, positive = D.latent(dit, SIZE, SIZE, seed=1), cond(dit)
    out = D.apply(patched(dit, features(ident), strength=strength, timestep=timestep), x, positive, sigma=sigma,
                  guidance=guidance)

    gold_pass = GoldPass(native_reference_pe(dit, ident.latents[:1]))
    empty = [[ident.context, {} if ident.y is None else {"pooled_output": ident.y}]]
    D.apply(dit, ident.latents[:1], empty, sigma=0.0 if timestep == ZERO else sigma, guidance=guidance,
            transformer_options={"patches": {"attn1_patch": [gold_pass]}})
    blend = GoldBlend(gold_pass.kv, strength)
    m = dit.clone()
    m.set_model_attn1_patch(blend.patch)
    want = D.apply(m, x, positive, sigma=sigma, guidance=guidance,
                   transformer_options={"optimized_attention_override": blend})
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["flux", "flux2", "qwen_image"])
def test_reference_positions_are_the_hosts_native_ones(name):
    """Several references of different sizes, placed by the family's method (Flux.1: offset,
    Flux.2: index ×10, Qwen-Image: index): the ids IDFusion gives each one rotate exactly as the
    host's own native references do."""
    from IDFusion.models.dit.families import family_of, latent_size, reference_ids, reference_method, reference_offsets
    model = D.tiny_dit(name, seed=8)
    refs = [D.latent(model, 6, 4, seed=1), D.latent(model, 4, 6, seed=2), D.latent(model, 2, 2, seed=3)]
    seen = {}

    def capture(q, k, v, pe=None, attn_mask=None, extra_options=None):
        seen.setdefault("pe", pe[:, :, pe.shape[2] - sum(extra_options["reference_image_num_tokens"]):])
        return {}
    D.apply(model, D.latent(model, SIZE, SIZE, seed=0), D.with_references(cond(model), refs),
            transformer_options={"patches": {"attn1_patch": [capture]}})
    dm, fam = model.model.diffusion_model, family_of(model.model)
    method, scale = reference_method(dm, fam)
    places = reference_offsets(method, [latent_size(r) for r in refs], scale)
    ids = torch.cat([reference_ids(dm, fam, r, *place) for r, place in zip(refs, places)], dim=1)
    assert torch.equal(dm.pe_embedder(ids).to(seen["pe"]), seen["pe"])


# --- the cache and the run store ---------------------------------------------------------------

@pytest.mark.parametrize("timestep", [ZERO, CURRENT])
def test_a_cache_hit_equals_a_fresh_pass(dit, timestep):
    model = patched(dit, features(identity(dit, 3, count=2)), timestep=timestep)
    positive = cond(dit)
    fresh = D.sample(model, positive, steps=3)
    first = passes()
    assert first > 0
    cached = D.sample(model, positive, steps=3)
    assert passes() == first, "the second run must read every reference from the cache"
    assert torch.equal(cached, fresh)


def test_timestep_zero_references_run_once_per_run_and_stay_on_the_device():
    model = D.tiny_dit("flux", seed=9)
    feats = features(identity(model, 4), identity(model, 5))
    D.sample(patched(model, feats, timestep=ZERO), cond(model), steps=4)
    assert passes() == 2, "one pass per identity for the whole run"
    assert stats()["hits"] == 0, "later steps use the run's device copies, not the cache"
    D.sample(patched(model, feats, timestep=CURRENT), cond(model), steps=4)
    assert passes() == 2 + 4 * 2, "FlashFace's references: one pass per identity and step"


def test_the_cache_stays_within_its_byte_budget():
    from IDFusion.models.feature_cache import FEATURE_CACHE
    model = D.tiny_dit("flux", seed=10)
    feats = features(identity(model, 6))
    D.sample(patched(model, feats, timestep=CURRENT), cond(model), steps=1)
    entry = stats()["bytes"]
    FEATURE_CACHE.reset()
    budget = FEATURE_CACHE.budget_bytes
    FEATURE_CACHE.budget_bytes = int(entry * 2.5)
    try:
        D.sample(patched(model, feats, timestep=CURRENT), cond(model), steps=4)
        now = stats()
        assert now["bytes"] <= FEATURE_CACHE.budget_bytes and now["entries"] == 2 and now["evictions"] == 2
    finally:
        FEATURE_CACHE.budget_bytes = budget


# --- several identities ------------------------------------------------------------------------

def test_isolation_region_j_never_attends_to_identity_i_in_any_block(dit):
    """Probe each identity's reference values (1 on identity i, 0 elsewhere, the block's own values
    0): the image rows of the other region get exactly 0 of it, in every block."""
    import dataclasses

    from comfy.ldm.flux.math import apply_rope, apply_rope1
    from IDFusion.models.dit.attention import block_attention
    from IDFusion.models.masks import IdentityMasks
    masks = torch.zeros(2, SIZE * 8, SIZE * 8)
    masks[0, :, :SIZE * 4] = 1
    masks[1, :, SIZE * 4:] = 1
    feats = features(identity(dit, 11, label="a"), identity(dit, 12, label="b"))
    model = patched(dit, feats, mode=REGION, outside="none", masks=IdentityMasks(masks, ("a", "b")))
    inputs = D.BlockInputs()
    model.set_model_attn1_patch(inputs)
    D.apply(model, D.latent(dit, SIZE, SIZE, seed=1), cond(dit))
    patch = dit.model.diffusion_model.patch_size
    columns = SIZE // patch
    assert inputs.blocks
    for q, k, v, pe, call, layout in inputs.blocks:
        qr, kr = (apply_rope1(q, pe), apply_rope1(k, pe)) if family(dit) == "qwen_image" else apply_rope(q, k, pe)
        (spec_call,) = call.references
        tokens = q.shape[2] - layout.txt
        owner = torch.tensor([0 if (t % columns) < columns // 2 else 1 for t in range(tokens)])
        for i in range(2):
            refs = [{key: (torch.ones_like(t) if (j == i and key[1] == "v") else
                           (torch.zeros_like(t) if key[1] == "v" else t)) for key, t in r.items()}
                    for j, r in enumerate(spec_call.refs)]
            probe_call = dataclasses.replace(call, references=[dataclasses.replace(spec_call, refs=refs)])
            mass = block_attention(probe_call, layout, qr, kr, torch.zeros_like(v), q.shape[1], None)[..., 0]
            image = mass[:, layout.txt:]
            assert torch.equal(image[:, owner != i], torch.zeros_like(image[:, owner != i])), f"{layout.block}: leak"
            assert bool((image[:, owner == i] > 0).all())
            assert torch.equal(mass[:, :layout.txt], torch.zeros_like(mass[:, :layout.txt])), "the text is left alone"


def test_identities_mix_by_weight_and_a_weight_of_zero_removes_one(dit):
    a, b = identity(dit, 13, label="a"), identity(dit, 14, label="b")
    positive = cond(dit)
    only_a = D.sample(patched(dit, features(a)), positive)
    assert torch.equal(D.sample(patched(dit, features(a, b, weights=[1.0, 0.0])), positive), only_a)
    mixed = D.sample(patched(dit, features(a, b, weights=[0.5, 0.5])), positive)
    assert not torch.allclose(mixed, only_a)


def test_blocks_selection_and_schedule():
    model = D.tiny_dit("flux", seed=15)
    feats = features(identity(model, 16))
    positive = cond(model)
    plain = D.sample(model, positive, steps=3)
    from IDFusion.nodes.dit import BLOCKS_DOUBLE, BLOCKS_SINGLE
    double = D.sample(patched(model, feats, blocks=BLOCKS_DOUBLE), positive, steps=3)
    single = D.sample(patched(model, feats, blocks=BLOCKS_SINGLE), positive, steps=3)
    assert not torch.allclose(double, single) and not torch.allclose(double, plain)
    late = patched(model, feats, start=0.99, end=1.0, timestep=CURRENT)
    assert torch.equal(D.sample(late, positive, steps=3), plain)
