"""ConsistentID's face side on the real host: the region rules, the encoding node (synthetic buffalo_l
pack, BiSeNet in facexlib's layout, ComfyUI's CLIP vision class), the content cache, and the
errors a user can cause."""
import numpy as np
import pytest
import torch

from idf_testlib import consistentid_fixtures as cf
from idf_testlib import face_fixtures

NODE = "IDFusionConsistentIDFace"


def encode(weights, analyzer, parser, photo, clip_vision, **options):
    from IDFusion.nodes.consistentid import ConsistentIDFace
    image = torch.from_numpy(photo)[None].float() / 255.0
    values = dict(label="person", arcface_input="RGB (official inference)", no_face="error")
    values.update(options)
    return ConsistentIDFace.execute(weights, analyzer, parser, image, clip_vision=clip_vision, **values).result


def test_region_rules_first_present_label_per_group_in_label_order(host):
    from IDFusion.models.consistentid.face import region_masks
    labels = np.zeros((512, 512), np.uint8)
    labels[100:140, 100:140] = 13            # lower lip only: the Lip region uses it
    labels[200:220, 300:330] = 5             # right eye only
    labels[200:220, 100:130] = 8             # right ear only...
    labels[240:260, 100:130] = 7             # ...and the left ear, which wins
    labels[300:400, 300:400] = 1             # skin with a hole (a nose inside)
    labels[340:360, 340:360] = 10
    found = region_masks(labels)
    assert [name for name, _ in found] == ["Face", "Eye", "Ear", "Nose", "Lip"]
    masks = dict(found)
    assert masks["Face"][350, 350] == 255                  # external contour filled: the hole is inside
    assert masks["Ear"][250, 110] == 255 and masks["Ear"][210, 110] == 0
    assert masks["Eye"][210, 310] == 255
    assert masks["Lip"][120, 120] == 255
    assert region_masks(np.zeros((512, 512), np.uint8)) == []


def test_the_node_encodes_a_photo(cid_weights, cid_analyzer, cid_parser, cid_photo, cid_clip_vision):
    faces, preview, crops = encode(cid_weights, cid_analyzer, cid_parser, cid_photo, cid_clip_vision)
    face = faces.faces[0]
    assert faces.count == 1 and faces.weights is cid_weights
    assert face.regions == ("Face", "Eye", "Ear", "Nose", "Lip")
    assert face.id_tokens.shape == face.uncond_id_tokens.shape == (4, 64)
    assert face.region_vectors.shape == (5, 64) and face.uncond_vector.shape == (64,)
    assert face.clip_states.shape == (257, 64) and abs(float(face.arcface.norm()) - 1) < 1e-5
    assert preview.shape == (1, 224, 224, 3) and crops.shape == (5, 224, 224, 3)
    outside = crops.sum(-1) == 0
    assert bool(outside.any()) and not bool(outside.all())         # each region image is the photo over black
    assert not torch.allclose(face.id_tokens, face.uncond_id_tokens)


def test_encodings_are_cached_by_content(cid_weights, cid_analyzer, cid_parser, cid_photo, cid_clip_vision):
    from IDFusion.models.consistentid.face import ENCODINGS
    ENCODINGS.reset()
    first = encode(cid_weights, cid_analyzer, cid_parser, cid_photo, cid_clip_vision)[0].faces[0]
    again = encode(cid_weights, cid_analyzer, cid_parser, cid_photo.copy(), cid_clip_vision)[0].faces[0]
    assert again is first and ENCODINGS.stats()["encodings"] == 1 and ENCODINGS.stats()["hits"] == 1
    other = cid_photo.copy()
    other[0, 0] = 255 - other[0, 0]
    encode(cid_weights, cid_analyzer, cid_parser, other, cid_clip_vision)
    encode(cid_weights, cid_analyzer, cid_parser, cid_photo, cid_clip_vision, arcface_input="BGR (insightface "
           "convention, as trained)")
    assert ENCODINGS.stats()["encodings"] == 3


def test_arcface_channel_order_is_a_choice(cid_weights, cid_analyzer, cid_parser, cid_photo, cid_clip_vision):
    from IDFusion.models.consistentid.face import ARCFACE_BGR, ARCFACE_RGB, arcface_embedding
    rgb, bgr = (arcface_embedding(cid_analyzer, cid_photo, order) for order in (ARCFACE_RGB, ARCFACE_BGR))
    swapped = np.ascontiguousarray(cid_photo[:, :, ::-1])
    assert np.array_equal(arcface_embedding(cid_analyzer, swapped, ARCFACE_BGR), rgb)   # RGB = channels swapped
    assert not np.allclose(rgb, bgr)


def test_missing_clip_vision_no_face_and_no_region_are_clear_errors(cid_weights, cid_analyzer, cid_parser, cid_photo,
                                                                     cid_clip_vision):
    from IDFusion.models.faces.parsing import FaceParser
    with pytest.raises(ValueError, match=f"{NODE}: 'clip_vision' is not connected; add a Load CLIP Vision node"):
        encode(cid_weights, cid_analyzer, cid_parser, cid_photo, None)
    empty = face_fixtures.canvas(224, 224, seed=4)
    with pytest.raises(ValueError, match=f"{NODE}: 'image' has no face .* set no_face to 'zero embedding"):
        encode(cid_weights, cid_analyzer, cid_parser, empty, cid_clip_vision)
    zeros = encode(cid_weights, cid_analyzer, cid_parser, empty, cid_clip_vision, no_face="zero embedding (official)")
    assert torch.count_nonzero(zeros[0].faces[0].arcface) == 0
    import comfy.model_management as mm
    import comfy.model_patcher
    from facexlib.parsing.bisenet import BiSeNet
    background = BiSeNet(num_class=19).eval()
    background.load_state_dict(cf.parser_state(labels=(0,)))
    patcher = comfy.model_patcher.ModelPatcher(background, mm.get_torch_device(), mm.unet_offload_device())
    only_background = FaceParser(patcher, "background.pth")
    with pytest.raises(ValueError, match=f"{NODE}: face parsing found none of ConsistentID's regions"):
        encode(cid_weights, cid_analyzer, only_background, cid_photo, cid_clip_vision)
    with pytest.raises(ValueError, match=f"{NODE}: 'image' holds 2 photos"):
        from IDFusion.nodes.consistentid import ConsistentIDFace
        image = torch.from_numpy(np.stack([cid_photo] * 2)).float() / 255.0
        ConsistentIDFace.execute(cid_weights, cid_analyzer, cid_parser, image, "p", "RGB (official inference)", "error",
                                 clip_vision=cid_clip_vision)


def test_a_clip_vision_of_another_width_is_a_clear_error(cid_weights, cid_analyzer, cid_parser, cid_photo):
    import comfy.clip_vision
    from idf_testlib.models import init_weights
    from idf_testlib.paths import CACHE
    path = CACHE / "tiny_clip_vision_32.json"
    path.write_text(__import__("json").dumps({**cf.TINY_VISION, "hidden_size": 32}))
    narrow = comfy.clip_vision.ClipVisionModel(str(path))
    init_weights(narrow.model, 1)
    with pytest.raises(ValueError, match=f"{NODE}: 'clip_vision' gives 32-wide states but .* expects 64"):
        encode(cid_weights, cid_analyzer, cid_parser, cid_photo, narrow)
