"""ConsistentID's text side: the caption and its markers equal the official rewrite for every set of
regions, the marked positions and ids equal the official tokenisation (the added-token tokenizer),
and the Conditioning node builds the text-only, facial and negative prompts from them."""
import itertools

import pytest
import torch

from idf_testlib import consistentid_fixtures as cf
from idf_testlib import consistentid_official as official

REGION_KEYS = {"Face": "Face", "Eye": "Left_Eye", "Ear": "Left_Ear", "Nose": "Nose", "Lip": "Upper_Lip"}
ALL = ("Face", "Eye", "Ear", "Nose", "Lip")
INFER_PROMPT = ("cinematic photo,A man, in a forest, adventuring, 50mm photograph, half-length portrait, film, bokeh, "
                "professional, 4k, highly detailed")
LONG_PROMPT = ", ".join(["a very detailed portrait photograph of a smiling person in a sunny garden"] * 5)


@pytest.fixture(scope="module")
def official_tokenizer(host):
    """The SD1.5 tokenizer with the official added tokens (<|image|> 49408, <|facial|> 49409)."""
    from pathlib import Path

    import comfy.sd1_clip
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(str(Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"),
                                              model_max_length=77)
    tokenizer.add_tokens([official.IMAGE_TOKEN], special_tokens=True)
    tokenizer.add_tokens([official.FACIAL_TOKEN], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids(official.FACIAL_TOKEN) == 49409
    return tokenizer


def official_masks(regions):
    return {REGION_KEYS[r]: r for r in regions}


@pytest.mark.parametrize("count", range(1, 6))
def test_the_caption_equals_the_official_rewrite_for_every_set_of_regions(host, count):
    from IDFusion.models.consistentid.text import facial_caption, pairing
    for regions in itertools.combinations(ALL, count):
        caption, kept = official.process_text_with_markers(official.CAPTION, official_masks(regions))
        assert facial_caption(regions) == caption
        assert list(kept) == [REGION_KEYS[r] for r in regions]           # nothing dropped, region order kept
        assert [region for _, region in pairing(regions)] == list(regions)


def test_ears_take_the_eye_region_as_in_the_official_code(host):
    from IDFusion.models.consistentid.text import pairing
    assert pairing(ALL) == [("face", "Face"), ("ears", "Eye"), ("eyes", "Ear"), ("nose", "Nose"), ("mouth", "Lip")]
    assert pairing(("Eye", "Nose")) == [("eyes", "Eye"), ("nose", "Nose")]


@pytest.mark.parametrize("prompt,regions,marks", [
    (INFER_PROMPT, ALL, (44, 47, 50, 53, 57)),
    (LONG_PROMPT, ALL, (7, 10, 13, 16, 20)),
    ("a woman", ("Eye", "Nose", "Lip"), None),
    ("", ("Face",), None),
])
def test_marks_and_ids_equal_the_official_tokenisation(cid_clip, official_tokenizer, prompt, regions, marks):
    from IDFusion.models.consistentid.text import MARKER, Tokenizer, prompt_tokens
    tokens = prompt_tokens(Tokenizer(cid_clip), prompt, regions)
    text_only, clean, _, mask, valid = official.encode_prompt_with_trigger_word(
        prompt, official.CAPTION, official_masks(regions), official_tokenizer)
    assert list(tokens.facial_ids) == clean[0].tolist()
    assert list(tokens.marks) == torch.nonzero(mask[0]).flatten().tolist()
    assert len(tokens.marks) == int(valid.sum()) == len(regions)
    plain = official_tokenizer(text_only, padding="max_length", max_length=77, truncation=True).input_ids
    assert list(tokens.text_only_ids) == plain
    assert tokens.prompt_face.replace(MARKER, "") == text_only
    if marks is not None:
        assert tokens.marks == marks
    if prompt == LONG_PROMPT:
        assert tokens.prompt_face.startswith("Detail:The person has one face")


def conditioning(clip, weights, faces, text="a photo of a man", negative="blurry", merge_at=0.6, **extra):
    from IDFusion.nodes.consistentid import ConsistentIDConditioning
    return ConsistentIDConditioning.execute(clip, weights, faces, text, negative, merge_at, extra.pop("person", 1),
                                            **extra).result


@pytest.fixture(scope="module")
def one_face(cid_weights):
    from IDFusion.models.consistentid.face import ConsistentIDFaces
    return ConsistentIDFaces(cid_weights, (cf.random_face(cid_weights, 1),), (1.0,))


def test_the_node_fuses_only_the_marked_rows(cid_clip, cid_weights, one_face):
    from IDFusion.models.consistentid.merge import FACIAL, MERGE, TEXT_ONLY
    from IDFusion.models.consistentid.text import Tokenizer, encode_ids, prompt_tokens
    positive, negative, facial_prompt = conditioning(cid_clip, cid_weights, one_face)
    (text_only, text_extra), (facial, facial_extra) = positive
    assert (text_extra[MERGE].phase, facial_extra[MERGE].phase) == (TEXT_ONLY, FACIAL)
    assert (text_extra["start_percent"], text_extra["end_percent"], facial_extra["start_percent"]) == (0.0, 0.6, 0.6)
    tokenizer = Tokenizer(cid_clip)
    tokens = prompt_tokens(tokenizer, "a photo of a man", one_face.faces[0].regions)
    assert facial_prompt == tokens.prompt_face
    plain, _ = encode_ids(cid_clip, tokenizer, tokens.facial_ids)
    assert torch.equal(text_only, encode_ids(cid_clip, tokenizer, tokens.text_only_ids)[0])
    marked = torch.zeros(77, dtype=torch.bool)
    marked[list(tokens.marks)] = True
    assert torch.equal(facial[0, ~marked], plain[0, ~marked])
    assert not torch.allclose(facial[0, marked], plain[0, marked])
    plain_negative, _ = encode_ids(cid_clip, tokenizer, tokenizer.prompt("blurry"))
    assert torch.equal(negative[0][0][0, ~marked], plain_negative[0, ~marked])
    assert not torch.allclose(negative[0][0][0, marked], plain_negative[0, marked])


def test_a_person_restricted_to_a_region(cid_clip, cid_weights, one_face):
    from IDFusion.models.masks import IdentityMasks
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32], masks[1, :, 32:] = 1, 1
    regions = IdentityMasks(masks, ("a", "b"))
    positive, negative, _ = conditioning(cid_clip, cid_weights, one_face, person=2, identity_masks=regions)
    for _, extra in positive:
        assert torch.equal(extra["mask"], masks[1:2]) and extra["set_area_to_bounds"] is False
    assert "mask" not in negative[0][1]
    with pytest.raises(ValueError, match="IDFusionConsistentIDConditioning: person is 3 but 'identity_masks' has 2"):
        conditioning(cid_clip, cid_weights, one_face, person=3, identity_masks=regions)


def test_conditioning_errors_name_the_node_and_the_fix(cid_clip, cid_weights, one_face):
    from IDFusion.models.consistentid.face import ConsistentIDFaces
    two = ConsistentIDFaces(cid_weights, one_face.faces * 2, (1.0, 1.0))
    with pytest.raises(ValueError, match="IDFusionConsistentIDConditioning: 'faces' holds 2 people"):
        conditioning(cid_clip, cid_weights, two)
