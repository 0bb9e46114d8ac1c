"""The DiT nodes on every host: below ComfyUI 0.17.0 (no attn1_patch in the Flux and Qwen-Image
blocks) each refuses with one message naming the minimum version; from 0.17.0 on the hooks are
there. Runs on every test host; the SD1.5/SDXL nodes are tested unchanged beside it."""
import pytest

from idf_testlib.dit_models import DIT_MIN_VERSION
from idf_testlib.paths import comfy_version

OLD_HOST = comfy_version() < DIT_MIN_VERSION


def calls(model):
    """Each DiT node's execute with the model first and placeholders elsewhere (the gate comes first)."""
    from IDFusion.nodes import dit
    yield dit.DiTFaceFeatures.execute, dict(model=model, vae=None, empty_prompt=None, size=512, disk_cache=False)
    yield dit.DiTReferenceAttention.execute, dict(model=model, features=None, strength=0.8, start_percent=0.0,
                                                   end_percent=1.0, blocks=dit.BLOCKS_ALL,
                                                   reference_timestep=dit.TIMESTEP_ZERO,
                                                   identity_mode="mix (weights)", outside="all")
    yield dit.DiTIdentityReferences.execute, dict(model=model, positive=None, negative=None, vae=None, identity_1=None,
                                                   strength_1=1.0, strength_2=1.0, strength_3=1.0, strength_4=1.0,
                                                   size=512, outside="all")


def test_dit_nodes_refuse_exactly_the_hosts_without_the_hooks(sd15):
    """An old host: every DiT node raises the one message. A new host: the hooks are found (and the
    nodes' other checks take over: here, that an SD1.5 model is not a DiT)."""
    from IDFusion.models.dit.host import MIN_VERSION, hooks_available
    assert MIN_VERSION == DIT_MIN_VERSION
    assert hooks_available() is not OLD_HOST
    version = ".".join(map(str, comfy_version()))
    for execute, kwargs in calls(sd15):
        with pytest.raises(ValueError) as err:
            execute(**kwargs)
        message = str(err.value)
        assert message.startswith("IDFusionDiT")
        if OLD_HOST:
            assert "needs ComfyUI 0.17.0 or newer" in message and f"this ComfyUI is {version}" in message
            assert "SD1.5/SDXL nodes work" in message
        else:
            assert "the DiT nodes patch" in message


def test_the_dit_nodes_register_on_every_host():
    """Their schemas build on old hosts too, so a shared workflow opens and explains itself."""
    from IDFusion.nodes import NODES
    from IDFusion.nodes.dit import NODES as DIT
    assert set(DIT) <= set(NODES)
    for node in DIT:
        schema = node.define_schema()
        assert schema.display_name.startswith("IDFusion DiT") and schema.category == "IDFusion/dit"
        assert all(i.tooltip for i in schema.inputs) and schema.description
