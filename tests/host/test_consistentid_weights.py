"""ConsistentID's released files: the official layout loads (safely) through the loader node, other
files get errors that list expected and found keys and the right folder, the converter round-trips,
the LoRA loads through ComfyUI's own LoRA machinery with every key used, and the processor order is
diffusers' own."""
import argparse
import logging
import subprocess
import sys

import pytest
import torch

from idf_testlib import consistentid_fixtures as cf
from idf_testlib import models
from idf_testlib.paths import CACHE, ROOT

FOLDER = CACHE / "models" / "consistentid"
#: The facts' table: processor index (attn1, attn2 pair) → ComfyUI block key, SD1.5.
SD15_KEYS = ([("input", n, 0) for n in (1, 2, 4, 5, 7, 8)] + [("output", n, 0) for n in range(3, 12)]
             + [("middle", 0, 0)])


def load_file(name):
    from IDFusion.nodes.consistentid import ConsistentIDLoader
    return ConsistentIDLoader.execute(name).result[0]


@pytest.fixture(scope="module")
def release_file(cid_groups):
    return cf.write_checkpoint(cid_groups, FOLDER / "tiny-ConsistentID-v1.bin")


def test_the_release_layout_loads_safely_through_the_loader_node(release_file, cid_groups, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    weights = load_file(release_file.name)
    assert calls and all(c.get("weights_only") is True and c.get("mmap") is True for c in calls)
    assert (weights.variant, weights.processors, weights.text_width, weights.clip_width, weights.rank) == \
        ("SD1.5", 32, 64, 64, 8)
    modules = weights.encoders.model
    for name, module in (("image_proj", modules.image_proj), ("FacialEncoder", modules.facial_encoder)):
        state = module.state_dict()
        assert set(state) == set(cid_groups[name])
        stored = torch.bfloat16 if name == "image_proj" else torch.float32
        assert all(torch.equal(state[k], v.to(stored).float()) for k, v in cid_groups[name].items())
    adapter = weights.adapter.model.layers
    assert sorted(int(i) for i in adapter) == list(range(1, 32, 2))
    assert torch.equal(adapter["31"].to_k_ip.weight, cid_groups["adapter_modules"]["31.to_k_ip.weight"])
    lora_up = cid_groups["adapter_modules"]["6.to_out_lora.up.weight"]
    assert torch.equal(weights.lora[6]["to_out_lora.up.weight"], lora_up)


def test_a_pickle_with_more_than_tensors_is_refused(host, tmp_path):
    from IDFusion.models.consistentid.weights import load
    path = tmp_path / "ConsistentID-v1.bin"
    torch.save({"FacialEncoder": {"x": torch.zeros(1)}, "note": argparse.Namespace(a=1)}, path)
    with pytest.raises(ValueError, match="holds pickled objects other than tensors; loading them is unsafe and refused"):
        load(str(path))


def write(tmp_path, content, name="ConsistentID-v1.bin"):
    path = tmp_path / name
    torch.save(content, path)
    return str(path)


def test_other_files_say_what_was_expected_found_and_where_they_belong(host, tmp_path, cid_groups):
    from IDFusion.models.consistentid.weights import load
    ip_adapter = {"image_proj": {"proj.weight": torch.zeros(2, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2)}}
    with pytest.raises(ValueError) as error:
        load(write(tmp_path, ip_adapter))
    message = str(error.value)
    for part in ("expected FacialEncoder.",
                 "found image_proj.* (1 key, e.g. image_proj.proj.weight), ip_adapter.* (1 key",
                 "missing FacialEncoder, adapter_modules", "models/ipadapter/", "belong in models/consistentid/"):
        assert part in message, message
    with pytest.raises(ValueError, match="Stable Diffusion checkpoint: it belongs in models/checkpoints/"):
        load(write(tmp_path, {"model.diffusion_model.out.0.weight": torch.zeros(2)}))
    broken = {k: dict(v) for k, v in cid_groups.items()}
    del broken["adapter_modules"]["3.to_v_ip.weight"]
    with pytest.raises(ValueError, match="attention processor 3 in adapter_modules"):
        load(write(tmp_path, broken))
    wrong = {k: dict(v) for k, v in cid_groups.items()}
    wrong["image_proj"]["norm.weight"] = torch.ones(5)
    with pytest.raises(ValueError, match="the image_proj group does not match"):
        load(write(tmp_path, wrong))


def test_the_sdxl_group_name_and_the_safetensors_converter(host, tmp_path, cid_groups):
    from IDFusion.models.consistentid.weights import load
    renamed = {"image_proj_model" if k == "image_proj" else k: v for k, v in cid_groups.items()}
    source = cf.write_checkpoint(renamed, tmp_path / "ConsistentID-v1.bin")
    target = tmp_path / "ConsistentID-v1.safetensors"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_consistentid.py"), str(source), str(target)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from_bin, from_safetensors = load(str(source)), load(str(target))
    for a, b in ((from_bin.encoders, from_safetensors.encoders), (from_bin.adapter, from_safetensors.adapter)):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_consistentid.py"), str(source),
                          str(tmp_path / "out.bin")], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "must end in .safetensors" in bad.stderr


def diffusers_names(layout):
    return [n.removesuffix(".processor") for n in cf.processor_names(layout)]


def test_processor_order_is_diffusers_own_and_the_facts_block_table(cid_model):
    from IDFusion.nodes.unet_blocks import attention_processors
    processors = attention_processors(cid_model)
    assert [name for name, _, _ in processors] == diffusers_names("sd15")
    assert [attn for _, _, attn in processors] == ["attn1", "attn2"] * 16
    assert [key for _, key, _ in processors] == [k for k in SD15_KEYS for _ in range(2)]
    sdxl = attention_processors(models.tiny_sdxl())
    assert [name for name, _, _ in sdxl] == diffusers_names("sdxl")
    parts = [key[0] for _, key, _ in sdxl]
    assert parts == ["input"] * 48 + ["output"] * 72 + ["middle"] * 20


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_the_lora_loads_through_comfy_with_every_key_used(host, layout, caplog):
    from IDFusion.models.consistentid.unet import lora_patches, lora_state_dict
    from IDFusion.models.consistentid.weights import from_groups
    from IDFusion.nodes.unet_blocks import attention_processors
    model = models.tiny_sd15() if layout == "sd15" else models.tiny_sdxl()
    weights = from_groups(cf.tiny_groups(layout), f"tiny-{layout}.bin", layout)
    processors = attention_processors(model)
    with caplog.at_level(logging.WARNING):
        patches = lora_patches(model, weights, processors)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(lora_state_dict(weights, processors)) == 8 * len(processors)
    assert len(patches) == 4 * len(processors)                # q, k, v, out of every attention
    name, key, _ = processors[-1]                              # the middle block's attn2
    target = f"diffusion_model.middle_block.1.transformer_blocks.{key[2]}.attn2.to_out.0.weight"
    assert target in patches
    weight = target.removeprefix("diffusion_model.")
    clone = model.clone()
    clone.add_patches(patches, 1.0)
    original = dict(model.model.diffusion_model.named_parameters())[weight].detach().clone()
    import comfy.model_management
    comfy.model_management.load_models_gpu([clone])
    merged = dict(model.model.diffusion_model.named_parameters())[weight].detach().clone()
    comfy.model_management.unload_all_models()
    lora = weights.lora[len(processors) - 1]
    delta = lora["to_out_lora.up.weight"].float() @ lora["to_out_lora.down.weight"].float()
    assert torch.allclose(merged - original, delta, atol=1e-5)


def test_weights_of_another_family_are_a_clear_error(host, cid_weights):
    from IDFusion.nodes.consistentid import ConsistentIDApply
    from IDFusion.models.consistentid.face import ConsistentIDFaces
    faces = ConsistentIDFaces(cid_weights, (cf.random_face(cid_weights),), (1.0,))
    with pytest.raises(ValueError, match=r"SD1\.5 release \(32 attentions\) but 'model' has 140"):
        ConsistentIDApply.execute(models.tiny_sdxl(), cid_weights, faces, 1.0, 1.0, "mix (weights)", "all")


def test_the_sdxl_release_layout_applies_to_an_sdxl_unet(host):
    from IDFusion.models.consistentid.face import ConsistentIDFaces
    from IDFusion.models.consistentid.weights import from_groups
    from IDFusion.nodes.consistentid import ConsistentIDApply
    from idf_testlib import engine as E
    groups = cf.tiny_groups("sdxl")
    groups["image_proj_model"] = groups.pop("image_proj")
    weights = from_groups(groups, "tiny-ConsistentID_SDXL-v1.bin", "tiny-sdxl")
    assert (weights.variant, weights.processors, weights.shortcut) == ("SDXL", 140, True)
    model = models.tiny_sdxl()
    faces = ConsistentIDFaces(weights, (cf.random_face(weights),), (1.0,))
    patched = ConsistentIDApply.execute(model, weights, faces, 1.0, 1.0, "mix (weights)", "all").result[0]
    x = torch.randn(2, 4, 16, 16, generator=E.gen(1)) * 5.0
    context = torch.randn(2, 77, 64, generator=E.gen(2))
    y = torch.randn(2, model.model.adm_channels, generator=E.gen(3))
    plain, with_id = (cf.unet_eps(m, x, 5.0, context, [0, 1], y=y) for m in (model, patched))
    assert not torch.allclose(plain, with_id)
    assert torch.equal(cf.unet_eps(model, x, 5.0, context, [0, 1], y=y), plain)
