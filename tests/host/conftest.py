"""Fixtures of the host tier (ComfyUI imported in process)."""
import pytest

from idf_testlib import models


@pytest.fixture(scope="session")
def sd15(host):
    """A tiny SD1.5-layout UNet (shared: tests patch clones of it, never the model itself)."""
    return models.tiny_sd15()


@pytest.fixture(autouse=True)
def fresh_cache(host):
    """Every host test starts with an empty feature cache and zeroed counters."""
    from IDFusion.models.feature_cache import FEATURE_CACHE
    FEATURE_CACHE.reset()


# --- ConsistentID (tiny models in the official layouts) ----------------------------------------------

@pytest.fixture(scope="session")
def cid_groups(host):
    from idf_testlib import consistentid_fixtures as cf
    return cf.tiny_groups("sd15", seed=1)


@pytest.fixture(scope="session")
def cid_weights(cid_groups):
    from IDFusion.models.consistentid.weights import from_groups
    return from_groups(cid_groups, "tiny-ConsistentID-v1.bin", "tiny-sd15")


@pytest.fixture(scope="session")
def cid_model(host):
    """A tiny SD1.5 UNet of the ConsistentID tests' own (tests load LoRA'd clones of it)."""
    return models.tiny_sd15(seed=3)


@pytest.fixture(scope="session")
def cid_clip(host):
    from idf_testlib import consistentid_fixtures as cf
    return cf.tiny_clip()


@pytest.fixture(scope="session")
def cid_clip_vision(host):
    from idf_testlib import consistentid_fixtures as cf
    return cf.tiny_clip_vision()


@pytest.fixture(scope="session")
def cid_parser(host):
    from idf_testlib import consistentid_fixtures as cf
    from IDFusion.models.faces.parsing import load_parser
    return load_parser(cf.parsing_weights().name)


@pytest.fixture(scope="session")
def cid_analyzer(host):
    from idf_testlib import face_fixtures
    from IDFusion.models.faces.analysis import load_analyzer
    face_fixtures.insightface_pack("buffalo_l")
    return load_analyzer("buffalo_l", "CPU", 320)


@pytest.fixture(scope="session")
def cid_photo():
    """A 224 × 224 photo with one synthetic face (RGB uint8)."""
    from idf_testlib import face_fixtures
    return face_fixtures.scene(224, 224, [face_fixtures.MarkerFace(112, 110, 70, 90)], seed=3)


# --- DiTs ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def dit_host(host):
    """The DiT hooks (ComfyUI 0.17.0 or newer). Older hosts skip the DiT tests with the reason; a
    host new enough never skips (a missing hook fails there, in CI and elsewhere)."""
    from idf_testlib.dit_models import DIT_MIN_VERSION
    from idf_testlib.paths import comfy_version
    if comfy_version() < DIT_MIN_VERSION:
        pytest.skip(f"the DiT hooks need ComfyUI {'.'.join(map(str, DIT_MIN_VERSION))} or newer; this host is "
                    f"{'.'.join(map(str, comfy_version()))} (tests/host/test_dit_host_gate.py checks the refusal here)")


# --- FlashFace (tiny checkpoints in the official layout; per test module) --------------------------------

@pytest.fixture(scope="module")
def flashface_checkpoint(host):
    """The official-layout file (.safetensors: same keys as the .ckpt, which the weights tests read)."""
    from idf_testlib import flashface_fixtures as fx
    return fx.write_tiny_checkpoints()["safetensors"]


@pytest.fixture(scope="module")
def official(flashface_checkpoint):
    """{"official": (main, reference), "comfy_eps": the same with ComfyUI's GroupNorm eps}: the
    official modules, re-implemented in tests/idf_testlib, with the checkpoint's weights."""
    from idf_testlib import flashface_fixtures as fx
    from idf_testlib import flashface_official as fo
    modules = fo.modules_from_checkpoint(flashface_checkpoint, **fx.TINY)
    return {"official": modules, "comfy_eps": fo.with_comfy_groupnorm_eps(*modules)}


@pytest.fixture(scope="module")
def flashface(flashface_checkpoint):
    """(MODEL, REFERENCE_NET) from the loader node, given a tiny SD1.5 MODEL."""
    from IDFusion.nodes.loaders import ReferenceNetLoader
    return tuple(ReferenceNetLoader.execute(models.tiny_sd15(), flashface_checkpoint.name).result)
