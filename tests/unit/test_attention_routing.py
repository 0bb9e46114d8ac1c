"""attention.routing: layer grids, cell coverage, ownership, per-query weights, mask fitting.

The expected token positions are worked out by hand from the documented cell rule: token
(r, c) of the layer with factor f covers latent rows [r·f, (r+1)·f) and columns
[c·f, (c+1)·f), cut at the border, and belongs to the identity covering the largest part of
it when the identities together cover at least half of it.
"""
import pytest
import torch

from IDFusion.attention.routing import cell_coverage, fit_to_latent, layer_grid, owners, query_weights


def unet_grids(height, width, levels=4):
    """Token grids of a UNet's levels: stride-2, padding-1, 3×3 convolutions (as SD1.5/SDXL downsample)."""
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, height, width)
    grids = [(height, width)]
    with torch.no_grad():
        for _ in range(levels - 1):
            x = conv(x)
            grids.append(tuple(x.shape[-2:]))
    return grids


@pytest.mark.parametrize("height,width,expected", [
    (9, 13, [(9, 13, 1), (5, 7, 2), (3, 4, 4), (2, 2, 8)]),
    (64, 64, [(64, 64, 1), (32, 32, 2), (16, 16, 4), (8, 8, 8)]),
    (64, 96, [(64, 96, 1), (32, 48, 2), (16, 24, 4), (8, 12, 8)]),
    (128, 72, [(128, 72, 1), (64, 36, 2), (32, 18, 4), (16, 9, 8)]),
    (75, 50, [(75, 50, 1), (38, 25, 2), (19, 13, 4), (10, 7, 8)]),
])
def test_layer_grid_finds_each_unet_level(height, width, expected):
    assert [layer_grid(h * w, height, width) for h, w, _ in expected] == expected
    assert [(h, w) for h, w, _ in expected] == unet_grids(height, width)


@pytest.mark.parametrize("seq_len", [100, 36, 0, 118])
def test_layer_grid_rejects_a_token_count_no_layer_has(seq_len):
    with pytest.raises(ValueError, match=f"no layer of a 9×13 latent has {seq_len} tokens"):
        layer_grid(seq_len, 9, 13)


def test_cell_coverage_cuts_cells_at_the_border():
    masks = torch.zeros(5, 5)
    masks[0, 0] = 1            # 1 of the 4 pixels of cell (0, 0)
    masks[0:2, 4] = 1          # all of cell (0, 2): rows 0–1, column 4 only
    masks[4, 0] = 1            # 1 of the 2 pixels of cell (2, 0): row 4, columns 0–1
    masks[4, 4] = 1            # all of the 1-pixel corner cell (2, 2)
    masks[2:4, 2:4] = 1        # all of cell (1, 1)
    masks[3, 4] = 1            # 1 of the 2 pixels of cell (1, 2): rows 2–3, column 4
    expected = torch.tensor([[0.25, 0.0, 1.0],
                             [0.0, 1.0, 0.5],
                             [0.5, 0.0, 1.0]])
    assert torch.equal(cell_coverage(masks, 2), expected)


def test_cell_coverage_of_large_cells_and_identity_factor():
    masks = torch.ones(5, 5)
    masks[0, 0] = 0
    # factor 4: cells (0,0) 4×4, (0,1) 4×1, (1,0) 1×4, (1,1) 1×1
    assert torch.equal(cell_coverage(masks, 4), torch.tensor([[15 / 16, 1.0], [1.0, 1.0]]))
    same = cell_coverage(masks.bool(), 1)
    assert same.dtype == torch.float32 and torch.equal(same, masks)


def test_cell_coverage_keeps_leading_dims():
    masks = torch.zeros(2, 3, 9, 13)
    masks[1, 2, 8, 12] = 1
    cov = cell_coverage(masks, 8)
    assert cov.shape == (2, 3, 2, 2)
    assert cov[1, 2, 1, 1] == 1 / 5 and cov.sum() == 1 / 5


@pytest.mark.parametrize("cover,owner", [
    ((0.6, 0.2), 0),
    ((0.0, 0.5), 1),           # exactly half, all by one identity: owned
    ((0.4, 0.45), 1),          # together more than half: the larger part wins
    ((0.9, 0.95), 1),          # overlapping masks
    ((0.3, 0.3), 0),           # a tie goes to the first identity (argmax)
    ((0.25, 0.25), 0),         # a tie at exactly half
    ((0.2, 0.29), None),       # together less than half: outside every region
    ((0.0, 0.0), None),
])
def test_owners_largest_part_if_at_least_half_covered(cover, owner):
    coverage = torch.tensor(cover).view(2, 1, 1)
    expected = torch.zeros(2, 1, 1)
    if owner is not None:
        expected[owner] = 1
    assert torch.equal(owners(coverage), expected)


def test_owners_batched_over_tokens_and_leading_dims():
    coverage = torch.tensor([[[0.6, 0.1, 0.0]], [[0.3, 0.3, 0.2]]]).permute(0, 2, 1).reshape(2, 3, 1, 1)
    # [B=2, M=3, 1, 1]: sample 0 → identity 0; sample 1 → identities 0 and 1 tie → 0
    assert torch.equal(owners(coverage).flatten(1), torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))


# A 9×13 latent, identity A on rows 0–3 × columns 0–5, identity B on rows 4–8 × columns 7–12.
H, W = 9, 13


def two_regions():
    masks = torch.zeros(2, H, W)
    masks[0, 0:4, 0:6] = 1
    masks[1, 4:9, 7:13] = 1
    return masks


# Owned cells (r, c) per factor, by hand:
# f=2 (5×7): A covers cells r∈{0,1}, c∈{0,1,2} fully. B covers r∈{2,3,4} (the last cut to row 8)
#   and c∈{4,5,6} fully, c=3 (columns 6–7) by half: owned.
# f=4 (3×4): A covers (0,0) fully and (0,1) (columns 4–7) by half: owned. B covers c=2 and the
#   1-column c=3 fully for r∈{1,2}; c=1 only by a quarter: not owned.
# f=8 (2×2): (0,0) has A 24/64 + B 4/64 < 1/2: outside. (0,1) is 8×5: B 20/40 = 1/2: B.
#   (1,0) is 1×8: B 1/8: outside. (1,1) is 1×5: B fully.
OWNED = {
    2: (7, [(r, c) for r in (0, 1) for c in (0, 1, 2)], [(r, c) for r in (2, 3, 4) for c in (3, 4, 5, 6)]),
    4: (4, [(0, 0), (0, 1)], [(1, 2), (1, 3), (2, 2), (2, 3)]),
    8: (2, [], [(0, 1), (1, 1)]),
}


def expected_alpha(factor, outside_value):
    if factor == 1:
        alpha = two_regions().flatten(1).t().clone()
        grid_w, a_cells, b_cells = W, [], []
    else:
        grid_w, a_cells, b_cells = OWNED[factor]
        grid_h = -(-H // factor)
        alpha = torch.zeros(grid_h * grid_w, 2)
        for i, cells in enumerate((a_cells, b_cells)):
            for r, c in cells:
                alpha[r * grid_w + c, i] = 1
    free = alpha.sum(-1) == 0
    alpha[free] = outside_value
    return alpha.unsqueeze(0)


@pytest.mark.parametrize("factor,seq_len", [(1, 117), (2, 35), (4, 12), (8, 4)])
def test_query_weights_put_each_region_on_its_tokens(factor, seq_len):
    mix = torch.tensor([0.7, 0.3])
    none = query_weights(two_regions(), seq_len, (H, W), mix, "none")
    every = query_weights(two_regions(), seq_len, (H, W), mix, "all")
    assert none.shape == every.shape == (1, seq_len, 2)
    assert torch.equal(none, expected_alpha(factor, torch.zeros(2)))
    assert torch.equal(every, expected_alpha(factor, mix))


def test_query_weights_of_batched_masks_are_per_sample():
    masks = torch.stack([two_regions(), two_regions().flip(0)])           # sample 1 swaps the identities
    alpha = query_weights(masks, 35, (H, W), torch.tensor([0.5, 0.5]), "none")
    assert alpha.shape == (2, 35, 2)
    assert torch.equal(alpha[0], expected_alpha(2, torch.zeros(2))[0])
    assert torch.equal(alpha[1], expected_alpha(2, torch.zeros(2))[0].flip(-1))


def test_query_weights_reject_masks_of_another_size_and_unknown_outside():
    with pytest.raises(ValueError, match="identity masks are 9×12 but the latent is 9×13"):
        query_weights(torch.zeros(2, 9, 12), 117, (H, W), torch.ones(2) / 2, "none")
    with pytest.raises(ValueError, match="outside must be 'all' or 'none', got 'some'"):
        query_weights(two_regions(), 117, (H, W), torch.ones(2) / 2, "some")
    with pytest.raises(ValueError, match="no layer of a 9×13 latent has 30 tokens"):
        query_weights(two_regions(), 30, (H, W), torch.ones(2) / 2, "none")


def test_fit_to_latent_takes_a_pixel_sized_mask_to_the_latent():
    latent = torch.zeros(2, H, W)
    latent[0, 1:4, 2:7] = 1
    latent[1, 5:9, 9:13] = 1
    pixels = latent.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)    # 72×104: the image size
    fitted = fit_to_latent(pixels, H, W)
    assert fitted.shape == (2, H, W) and fitted.dtype == torch.float32
    assert torch.equal(fitted, latent)


def test_fit_to_latent_keeps_a_latent_sized_mask_and_upsamples_a_small_one():
    latent = (torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0)) > 0.5)
    assert torch.equal(fit_to_latent(latent, H, W), latent.float())
    up = fit_to_latent(latent, 2 * H, 2 * W)
    assert up.shape == (1, 3, 2 * H, 2 * W)
    assert torch.equal(up, latent.float().repeat_interleave(2, -2).repeat_interleave(2, -1))


@pytest.mark.parametrize("mask_h", [513, 520, 504])
def test_fit_to_latent_accepts_an_aspect_ratio_within_two_percent(mask_h):
    fitted = fit_to_latent(torch.ones(mask_h, 768), 64, 96)                # h/w off by 0.2 %, 1.6 %, 1.6 %
    assert fitted.shape == (64, 96)
    torch.testing.assert_close(fitted, torch.ones(64, 96))


@pytest.mark.parametrize("mask_h", [525, 498])
def test_fit_to_latent_rejects_an_aspect_ratio_just_beyond_two_percent(mask_h):
    with pytest.raises(ValueError, match=f"mask is 768×{mask_h}"):        # h/w off by 2.5 %, 2.7 %
        fit_to_latent(torch.ones(mask_h, 768), 64, 96)


def test_fit_to_latent_rejects_another_aspect_ratio_naming_both_sizes():
    with pytest.raises(ValueError) as err:
        fit_to_latent(torch.ones(2, 72, 72), H, W, what="identity masks")
    message = str(err.value)
    assert "identity masks is 72×72 (w×h)" in message
    assert "104×72" in message                   # the image being generated, w×h
    with pytest.raises(ValueError, match=r"mask is 512×768 \(w×h\) but the image being generated is 768×512; make it"):
        fit_to_latent(torch.ones(768, 512), 64, 96)
    with pytest.raises(ValueError, match="; set the size"):
        fit_to_latent(torch.ones(768, 512), 64, 96, fix="set the size")
