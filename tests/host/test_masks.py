"""The multi-ID mask builder and the face position mask node, in process."""
import numpy as np
import pytest
import torch

COLUMNS, MASKS, FACES = "columns (left to right)", "masks (one per identity)", "face boxes (left to right)"
EARLIER, SMALLER, NEAREST = "earlier identity wins", "smaller region wins", "nearest centre"


def build(width=64, height=48, count=2, source=COLUMNS, overlap=EARLIER, margin=0.5, **kw):
    from IDFusion.nodes.masks import MultiIDMasks
    return MultiIDMasks.execute(width, height, count, source, overlap, margin, **kw)


def test_columns_split_the_width_and_preview_colours_each_region(host):
    out = build(width=100, height=30, count=3)
    id_masks, masks, preview = out.result
    assert masks.shape == (3, 30, 100) and id_masks.count == 3
    assert masks.sum(0).eq(1).all()                                          # disjoint and covering
    assert [int(m[0].nonzero()[0]) for m in masks] == [0, 33, 67]
    assert preview.shape == (1, 30, 100, 3)
    colours = {tuple(preview[0, 5, x].tolist()) for x in (10, 50, 90)}
    assert len(colours) == 3
    assert out.ui is not None


@pytest.mark.parametrize("rule,owner", [(EARLIER, 0), (SMALLER, 1), (NEAREST, None)])
def test_overlap_rules_give_each_pixel_one_owner(host, rule, owner):
    raw = torch.zeros(2, 40, 40)
    raw[0, :, :30] = 1                                                       # big left region
    raw[1, 10:30, 20:40] = 1                                                 # smaller right region, overlapping
    masks = build(width=40, height=40, source=MASKS, overlap=rule, masks=raw).result[1]
    assert masks.sum(0).max() == 1
    overlap = (raw[0] > 0) & (raw[1] > 0)
    if owner is not None:
        assert masks[owner][overlap].eq(1).all()
    else:                                                                    # split by distance to the centres
        assert masks[0][15, 20] == 1 and masks[1][15, 29] == 1


def test_masks_at_the_same_aspect_ratio_are_resized(host):
    raw = torch.zeros(2, 24, 32)
    raw[0, :, :16] = 1
    raw[1, :, 16:] = 1
    masks = build(width=64, height=48, source=MASKS, masks=raw).result[1]
    assert masks.shape == (2, 48, 64)
    assert masks[0, :, :32].eq(1).all() and masks[1, :, 32:].eq(1).all()


def face(x1, y1, x2, y2):
    from IDFusion.models.faces.analysis import Face
    return Face(bbox=(x1, y1, x2, y2), score=0.9, kps=np.zeros((5, 2)))


def faces_of(per_image, sizes):
    from IDFusion.models.faces.analysis import Faces
    return Faces(tuple(tuple(f) for f in per_image), tuple(sizes), torch.zeros(0, 8, 8, 3), torch.zeros(0, 8, 8, 3))


def test_face_boxes_grow_by_the_margin_and_order_left_to_right(host):
    faces = faces_of([[face(120, 20, 160, 60), face(20, 20, 60, 60)]], [(100, 200)])
    masks = build(width=400, height=200, source=FACES, margin=0.25, faces=faces).result[1]
    # left face (20..60 → ×2 → 40..120, grown 20 each side): columns 20..140, rows 40-20..120+20
    assert masks[0, 100].nonzero().flatten().tolist() == list(range(20, 140))
    assert masks[1, 100].nonzero().flatten().tolist() == list(range(220, 340))
    assert masks[0, :, 80].nonzero().flatten().tolist() == list(range(20, 140))


def test_bad_inputs_name_the_input(host):
    with pytest.raises(ValueError, match="'masks' holds 3 mask.*'count' is 2"):
        build(source=MASKS, masks=torch.ones(3, 48, 64))
    with pytest.raises(ValueError, match="'masks' is not connected"):
        build(source=MASKS)
    empty = torch.zeros(2, 48, 64)
    empty[0] = 1
    with pytest.raises(ValueError, match="identity 2's region is empty"):
        build(source=MASKS, masks=empty)
    with pytest.raises(ValueError, match="'masks'.*64×64.*64×48"):
        build(width=64, height=48, source=MASKS, masks=torch.ones(2, 64, 64))
    faces = faces_of([[face(0, 0, 10, 10)]], [(48, 64)])
    with pytest.raises(ValueError, match="image 0 of 'faces' has 1 face.*'count' is 2"):
        build(source=FACES, faces=faces)
    with pytest.raises(ValueError, match="'faces' is not connected"):
        build(source=FACES)


def test_position_mask_is_flashface_square(host):
    from IDFusion.nodes.masks import FacePositionMask
    mask, preview = FacePositionMask.execute(100, 200, 0.1, 0.2, 0.3, 0.3).result
    # box 10..30 × 40..60 px: side max(20, 20) = 20 anchored at (10, 40)
    assert mask.shape == (1, 200, 100)
    assert mask[0].nonzero().min(0).values.tolist() == [40, 10]
    assert mask[0].nonzero().max(0).values.tolist() == [59, 29]
    wide = FacePositionMask.execute(100, 100, 0.1, 0.1, 0.5, 0.2).result[0][0]
    assert wide.sum() == 40 * 40                                             # square of the longer side
    with pytest.raises(ValueError, match="empty"):
        FacePositionMask.execute(100, 100, 0.5, 0.1, 0.4, 0.2)


def official_demo_mask(box, width: int, height: int) -> torch.Tensor:
    """flashface/all_finetune/demo_gradio.py: the normalised box to pixels with int(), squared."""
    face_bbox = [int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height)]
    max_size = max(face_bbox[2] - face_bbox[0], face_bbox[3] - face_bbox[1])
    empty_mask = torch.zeros((height, width))
    empty_mask[face_bbox[1]:face_bbox[1] + max_size, face_bbox[0]:face_bbox[0] + max_size] = 1
    return empty_mask


def test_face_position_mask_is_the_official_demo_mask_pixel_for_pixel(host):
    """Random boxes at the demo's 768 px and at odd sizes; among them boxes where rounding the
    side (instead of truncating each coordinate first) would move an edge by one pixel."""
    from IDFusion.nodes.masks import FacePositionMask
    gen = torch.Generator().manual_seed(3)
    moved = 0
    for width, height in ((768, 768), (640, 448), (200, 136)):
        for _ in range(40):
            x1, y1 = (torch.rand(2, generator=gen) * 0.6).tolist()
            x2, y2 = (v + 0.05 + 0.3 * float(torch.rand(1, generator=gen)) for v in (x1, y1))
            mask = FacePositionMask.execute(width, height, x1, y1, x2, y2).result[0][0]
            assert torch.equal(mask, official_demo_mask((x1, y1, x2, y2), width, height))
            side = max(int(x2 * width) - int(x1 * width), int(y2 * height) - int(y1 * height))
            moved += round(max((x2 - x1) * width, (y2 - y1) * height)) != side
    assert moved > 0
