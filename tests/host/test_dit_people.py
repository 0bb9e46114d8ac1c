"""Several people as native references of an edit DiT — per-person log-bias strengths and region
routing — against the real host: tiny Flux.1 (Kontext-style), Flux.2 and Qwen-Image models built
from the host's classes, their references fed as ReferenceLatent feeds them.

The gold is the host's own attention computed with an explicit bias (a test-side attention
override: softmax(q·kᵀ/√d + log w)·v), the layout read from the host's hook; isolation is
measured on every block's real inputs by probing the patched block's attention."""
import math

import pytest
import torch

from idf_testlib import dit_models as D

pytestmark = pytest.mark.usefixtures("dit_host")

FAMILIES = ["flux", "flux2", "qwen_image"]
SIZE = 8                                    # latent 8×8
LEFT, RIGHT = (0, 2), (6, 8)                # person 1 and person 2 regions, in latent columns


@pytest.fixture(scope="module", params=FAMILIES)
def dit(request):
    return D.tiny_dit(request.param, seed=3)


def refs_for(model, counts, seed=20):
    """Reference latents of each person (several sizes; person p has counts[p] images)."""
    sizes = [(6, 6), (4, 6), (6, 4), (4, 4)]
    out, i = [], 0
    for count in counts:
        person = []
        for _ in range(count):
            person.append(D.latent(model, *sizes[i % len(sizes)], seed=seed + i))
            i += 1
        out.append(person)
    return out


def region_masks(columns=(LEFT, RIGHT)):
    """One mask per person at 8 px per latent pixel, covering the given latent columns."""
    masks = torch.zeros(len(columns), SIZE * 8, SIZE * 8)
    for p, (a, b) in enumerate(columns):
        masks[p, :, a * 8:b * 8] = 1
    return masks


def people(model, counts, strengths, masks=None, outside="all", shared=0):
    from IDFusion.models.dit.engine import PeopleSpec
    from IDFusion.models.dit.families import dit_blocks, family_of
    from IDFusion.models.engine import MODE_MIX, MODE_REGION, Routing
    from IDFusion.nodes.dit import current_plan, install
    m = model.clone()
    routing = Routing(MODE_MIX) if masks is None else Routing(MODE_REGION, masks, outside)
    blocks = frozenset(dit_blocks(m.model.diffusion_model, family_of(m.model)))
    spec = PeopleSpec("test", shared, tuple(counts), tuple(strengths), routing, blocks)
    install(m, current_plan(m).with_people(spec))
    return m


def cond_with(model, refs):
    return D.with_references(D.conditioning(4), refs)


def x_for(model):
    return D.latent(model, SIZE, SIZE, seed=1)


# --- equivalences ------------------------------------------------------------------------------

def test_strength_one_without_masks_equals_the_native_references(dit):
    """Exactly: with every weight 1 the host's own attention runs."""
    a, b = refs_for(dit, [1, 2])
    cond = cond_with(dit, a + b)
    x = x_for(dit)
    assert torch.equal(D.apply(people(dit, [1, 2], [1.0, 1.0]), x, cond), D.apply(dit, x, cond))


def test_strength_zero_equals_the_model_without_those_references(dit):
    """A shared reference stays; both people at strength 0 leave exactly the model that never had theirs."""
    shared, a, b = refs_for(dit, [1, 1, 2])
    x = x_for(dit)
    out = D.apply(people(dit, [1, 2], [0.0, 0.0], shared=1), x, cond_with(dit, shared + a + b))
    torch.testing.assert_close(out, D.apply(dit, x, cond_with(dit, shared)), rtol=1e-5, atol=1e-5)


def test_one_person_with_a_full_mask_equals_the_unrouted_path(dit):
    (a,) = refs_for(dit, [2])
    cond, x = cond_with(dit, a), x_for(dit)
    full = region_masks([(0, SIZE)])
    routed = D.apply(people(dit, [2], [1.7], masks=full), x, cond)
    assert torch.equal(routed, D.apply(people(dit, [2], [1.7]), x, cond))


def test_the_input_model_is_unchanged(dit):
    a, b = refs_for(dit, [1, 1])
    cond, x = cond_with(dit, a + b), x_for(dit)
    before = D.apply(dit, x, cond)
    D.apply(people(dit, [1, 1], [0.3, 3.0], masks=region_masks()), x, cond)
    assert torch.equal(D.apply(dit, x, cond), before)
    assert "idfusion_dit_plan" not in dit.model_options.get("transformer_options", {})


# --- the gold: the host's attention with the explicit bias --------------------------------------

def image_owner(model, token: int) -> int:
    """The person whose region holds image token ``token`` (−1: outside), from the token grid."""
    patch = model.model.diffusion_model.patch_size
    col = token % (SIZE // patch)
    latent_cols = set(range(col * patch, (col + 1) * patch))
    for p, (a, b) in enumerate((LEFT, RIGHT)):
        if latent_cols <= set(range(a, b)):
            return p
    return -1


class GoldPeople:
    """attn1_patch (reads the layout) + attention override (softmax with the explicit bias)."""

    def __init__(self, model, shared, counts, strengths, routed, outside_all):
        self.model, self.shared, self.counts, self.strengths = model, shared, counts, strengths
        self.routed, self.outside_all = routed, outside_all
        self.calls = 0

    def patch(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        self.layout = (extra_options["img_slice"][0], list(extra_options.get("reference_image_num_tokens") or []))
        return {}

    def key_owners(self, k_len):
        txt, tokens = self.layout
        owners = torch.full((k_len,), -2)
        start = k_len - sum(tokens)
        person_of_image = [-1] * self.shared + [p for p, n in enumerate(self.counts) for _ in range(n)]
        for i, n in enumerate(tokens):
            owners[start:start + n] = person_of_image[i]
            start += n
        return owners

    def bias(self, q_len, k_len):
        txt, tokens = self.layout
        image_end = k_len - sum(tokens)
        owners = self.key_owners(k_len)
        bias = torch.zeros(q_len, k_len, dtype=torch.float64)
        for p, s in enumerate(self.strengths):
            cols = owners == p
            log_s = math.log(s) if s > 0 else float("-inf")
            bias[:txt, cols] = log_s
            for t in range(image_end - txt):
                owner = image_owner(self.model, t)
                sees = not self.routed or owner == p or (owner == -1 and self.outside_all)
                bias[txt + t, cols] = log_s if sees else float("-inf")
            for r in range(image_end, q_len):
                bias[r, cols] = 0.0 if owners[r] == p else (float("-inf") if self.routed else log_s)
        return bias

    def __call__(self, func, q, k, v, heads, mask=None, **kwargs):
        self.calls += 1
        scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + self.bias(q.shape[2], k.shape[2])
        out = torch.softmax(scores, dim=-1) @ v.double()
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d).to(q.dtype)


@pytest.mark.parametrize("outside", ["all", "none"])
def test_routed_people_equal_the_hosts_attention_with_the_explicit_bias(dit, outside):
    shared, a, b = refs_for(dit, [1, 1, 2])
    cond, x = cond_with(dit, shared + a + b), x_for(dit)
    strengths = (0.5, 2.5)
    out = D.apply(people(dit, [1, 2], strengths, masks=region_masks(), outside=outside, shared=1), x, cond)
    gold = GoldPeople(dit, 1, [1, 2], strengths, routed=True, outside_all=outside == "all")
    m = dit.clone()
    m.set_model_attn1_patch(gold.patch)
    want = D.apply(m, x, cond, transformer_options={"optimized_attention_override": gold})
    assert gold.calls > 0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_unrouted_strengths_equal_the_hosts_attention_with_the_log_bias(dit):
    a, b = refs_for(dit, [2, 1])
    cond, x = cond_with(dit, a + b), x_for(dit)
    strengths = (0.25, 4.0)
    out = D.apply(people(dit, [2, 1], strengths), x, cond)
    gold = GoldPeople(dit, 0, [2, 1], strengths, routed=False, outside_all=True)
    m = dit.clone()
    m.set_model_attn1_patch(gold.patch)
    want = D.apply(m, x, cond, transformer_options={"optimized_attention_override": gold})
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# --- measured isolation ------------------------------------------------------------------------

def block_count(model) -> int:
    dm = model.model.diffusion_model
    if hasattr(dm, "transformer_blocks"):
        return len(dm.transformer_blocks)
    return len(dm.double_blocks) + len(dm.single_blocks)


def rotated(family, q, k, pe):
    from comfy.ldm.flux.math import apply_rope, apply_rope1
    if family == "qwen_image":
        return apply_rope1(q, pe), apply_rope1(k, pe)
    return apply_rope(q, k, pe)


def person_masses(family, block, counts, shared):
    """Per person: the probability [B, Lq] the patched block's attention gives their keys (a probe
    value of 1 on those keys, 0 elsewhere, through the real block attention)."""
    from IDFusion.models.dit.attention import block_attention
    q, k, v, pe, call, layout = block
    qr, kr = rotated(family, q, k, pe)
    image_end = k.shape[2] - sum(layout.ref_tokens)
    start = image_end + sum(layout.ref_tokens[:shared])
    masses, first = [], shared
    for count in counts:
        stop = start + sum(layout.ref_tokens[first:first + count])
        probe = torch.zeros_like(v)
        probe[:, :, start:stop] = 1.0
        out = block_attention(call, layout, qr, kr, probe, q.shape[1], None)
        masses.append(out[..., 0])
        start, first = stop, first + count
    return masses, layout.txt, image_end


@pytest.mark.parametrize("outside", ["all", "none"])
def test_isolation_region_j_never_attends_to_person_i_in_any_block(dit, outside):
    shared, a, b = refs_for(dit, [1, 1, 2])
    model = people(dit, [1, 2], [1.0, 1.0], masks=region_masks(), outside=outside, shared=1)
    inputs = D.BlockInputs()
    model.set_model_attn1_patch(inputs)
    D.apply(model, x_for(dit), cond_with(dit, shared + a + b))
    family = dit.model.model_config.unet_config["image_model"]
    assert len(inputs.blocks) == block_count(dit)
    for block in inputs.blocks:
        masses, txt, image_end = person_masses(family, block, [1, 2], shared=1)
        owners = torch.tensor([image_owner(dit, t) for t in range(image_end - txt)])
        for p, mass in enumerate(masses):
            image = mass[:, txt:image_end]
            other = owners == 1 - p
            assert torch.equal(image[:, other], torch.zeros_like(image[:, other])), f"{block[5].block}: region leak"
            assert bool((image[:, owners == p] > 0).all())
            outside_mass = image[:, owners == -1]
            assert bool((outside_mass > 0).all()) if outside == "all" else torch.equal(outside_mass,
                                                                                       torch.zeros_like(outside_mass))
            assert bool((mass[:, :txt] > 0).all()), "the text sees every person"


# --- the host's FluxKVCache --------------------------------------------------------------------

def test_with_the_hosts_flux_kv_cache_a_full_mask_equals_the_cache_alone():
    """FluxKVCache (Flux.2: timestep-zero references) serves the references' keys/values from its
    cache after the first call, the queries then without reference rows; sampling through it,
    routing still equals the cache alone."""
    from comfy_extras.nodes_flux import FluxKVCache
    model = D.tiny_dit("flux2", seed=5)
    (a,) = refs_for(model, [2])
    cond = cond_with(model, a)
    alone = D.sample(FluxKVCache.execute(model).result[0], cond, steps=3, h=SIZE, w=SIZE)
    kv_routed = people(FluxKVCache.execute(model).result[0], [2], [1.0], masks=region_masks([(0, SIZE)]))
    torch.testing.assert_close(D.sample(kv_routed, cond, steps=3, h=SIZE, w=SIZE), alone, rtol=1e-4, atol=1e-4)


def test_with_the_hosts_flux_kv_cache_regions_stay_isolated():
    from comfy_extras.nodes_flux import FluxKVCache
    model = D.tiny_dit("flux2", seed=6)
    a, b = refs_for(model, [1, 1])
    routed = people(FluxKVCache.execute(model).result[0], [1, 1], [1.0, 1.0], masks=region_masks(), outside="none")
    inputs = D.BlockInputs()
    routed.set_model_attn1_patch(inputs)
    cond, x = cond_with(model, a + b), x_for(model)
    D.apply(routed, x, cond)
    first = len(inputs.blocks)
    D.apply(routed, x, cond)                                    # served from the cache: no reference queries
    assert any(blk[0].shape[2] < blk[1].shape[2] for blk in inputs.blocks[first:])
    for block in inputs.blocks[first:]:
        q, k = block[0], block[1]
        if q.shape[2] == k.shape[2]:
            continue
        masses, txt, image_end = person_masses("flux2", block, [1, 1], shared=0)
        owners = torch.tensor([image_owner(model, t) for t in range(image_end - txt)])
        for p, mass in enumerate(masses):
            image = mass[:, txt:image_end]
            assert torch.equal(image[:, owners != p], torch.zeros_like(image[:, owners != p]))


# --- errors ------------------------------------------------------------------------------------

def test_a_reference_count_that_does_not_match_the_node_fails_by_name(dit):
    a, b = refs_for(dit, [1, 1])
    model = people(dit, [1, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"test: the sampled conditioning carries 3 reference latent\(s\)"):
        D.apply(model, x_for(dit), cond_with(dit, a + b + a))
