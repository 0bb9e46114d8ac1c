"""The feature cache's weights key through the real server: models that differ in a single tensor
never share reference features — a checkpoint with other cross-attention keys (as a Custom
Diffusion fine-tune has), a LoRA differing in one value, a FlashFace file of the same name whose
ReferenceNet differs in one value — run one after the other in both orders, with and without
POST /free between the runs.

The reference picture of each model is that of its first run, which must have made every
reference pass itself (reference photo unique to this module; no cache or disk hit), so it is
what a fresh server computes; the fresh server itself confirms two of them."""
import numpy as np
import pytest
from PIL import Image

from idf_testlib import face_fixtures as faces
from idf_testlib import prompts, variants
from idf_testlib.models import SD15_CHECKPOINT
from idf_testlib.server import execution_error

PHOTO = "idf_weights_key_face.png"
#: Reference passes a first run makes: 2 steps, one identity, both guidance branches in one call.
PASSES = 2
#: a, b, a, then /free, b, /free, a: both orders, with and without /free.
SEQUENCE = [(0, False), (1, False), (0, False), (1, True), (0, True)]
#: /free for each kind: a new checkpoint object after it for the UNet kind (node cache dropped too);
#: models unloaded (weights unpatched, patchers detached) for the others, whose base stays cached.
FREE = {"unet tensor": dict(unload_models=True, free_memory=True), "lora": dict(unload_models=True, free_memory=False),
        "reference net": dict(unload_models=True, free_memory=False)}


@pytest.fixture(scope="module")
def kinds(server, fresh_server, prepared):
    """Per kind of weight: the two prompts that differ only in it."""
    photo = faces.scene(224, 192, [faces.MarkerFace(cx=100, cy=104, width=64, height=84, roll=4)], seed=42)
    for srv in (server, fresh_server):
        Image.fromarray(photo).save(srv.workdir / "input" / PHOTO)
    lora_a, lora_b = variants.lora_pair()
    face_a, face_b = variants.flashface_pair()
    changed = variants.checkpoint_variant().name
    make = lambda prefix, **kw: prompts.reference_prompt(prefix, photo=PHOTO, **kw)     # noqa: E731
    return {
        "unet tensor": (make("idf_key_ckpt_a"), make("idf_key_ckpt_b", ckpt_name=changed)),
        "lora": (make("idf_key_lora_a", lora=lora_a), make("idf_key_lora_b", lora=lora_b)),
        "reference net": (make("idf_key_ff_a", flashface=face_a), make("idf_key_ff_b", flashface=face_b)),
    }


def run(server, prompt) -> tuple[np.ndarray, dict]:
    """The saved picture, and how many reference passes, cache hits and disk hits the prompt made."""
    before = server.get("/idfusion/stats")
    entry = server.run(prompt, timeout=900)
    assert execution_error(entry) is None, execution_error(entry)
    after = server.get("/idfusion/stats")
    return prompts.pixels(server, entry), {k: after[k] - before[k] for k in ("reference_passes", "hits", "disk_hits")}


@pytest.mark.parametrize("kind", list(FREE))
def test_models_differing_in_one_tensor_never_share_features(server, kinds, kind):
    first = {}
    for step, (which, free_first) in enumerate(SEQUENCE, start=1):
        if free_first:
            server.free(**FREE[kind])
        picture, counts = run(server, kinds[kind][which])
        label = f"{kind}: run {step} (model {'ab'[which]}{' after /free' if free_first else ''})"
        if which not in first:
            assert counts == {"reference_passes": PASSES, "hits": 0, "disk_hits": 0}, \
                f"{label} reused features of another model: {counts}"
            first[which] = picture
        else:
            assert np.array_equal(picture, first[which]), f"{label} differs from the model's first picture"
    assert not np.array_equal(first[0], first[1]), f"{kind}: both models give the same picture; the test is blind"


@pytest.mark.parametrize("kind", ["lora", "reference net"])
def test_the_changed_models_picture_is_a_fresh_servers(server, fresh_server, kinds, kind):
    fresh = run(fresh_server, kinds[kind][1])[0]
    fresh_server.free()                  # its models' memory back before the next test loads others
    assert np.array_equal(run(server, kinds[kind][1])[0], fresh)


def test_the_changed_checkpoint_differs_in_exactly_one_tensor(prepared):
    """The fixture is what the test above says: the same file but for the bytes of one tensor."""
    base, changed = variants.sd15_checkpoint(), variants.checkpoint_variant()
    offset, length, _ = variants.tensor_span(changed, variants.CROSS_ATTENTION_KEY)
    assert changed.name != SD15_CHECKPOINT and base.stat().st_size == changed.stat().st_size
    with open(base, "rb") as a, open(changed, "rb") as b:
        assert a.read(offset) == b.read(offset)
        assert a.read(length) != b.read(length)
        while True:
            chunk_a, chunk_b = a.read(1 << 24), b.read(1 << 24)
            assert chunk_a == chunk_b
            if not chunk_a:
                break
