"""FlashFace checkpoint reading and conversion, in plain torch (no ComfyUI).

The synthetic checkpoints come from tests/idf_testlib/flashface_fixtures.py, a module tree
written after the official code, independent of the mapping under test.
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from IDFusion.models.flashface import weights as fw
from idf_testlib import flashface_fixtures as fx
from idf_testlib.paths import ROOT

BLOCKS_WITH_EXTRA = [("middle", 0, 0)] + [("output", n, 0) for n in range(3, 12)]
# Official name -> ComfyUI name, written out by hand from the two codebases.
SPOT_CHECKS = {
    "time_embedding.0.weight": "time_embed.0.weight",
    "time_embedding.2.bias": "time_embed.2.bias",
    "head.0.weight": "out.0.weight",
    "head.2.bias": "out.2.bias",
    "encoder.0.weight": "input_blocks.0.0.weight",
    "encoder.1.0.layer1.0.weight": "input_blocks.1.0.in_layers.0.weight",
    "encoder.1.0.layer1.2.bias": "input_blocks.1.0.in_layers.2.bias",
    "encoder.1.0.embedding.1.weight": "input_blocks.1.0.emb_layers.1.weight",
    "encoder.1.0.layer2.0.bias": "input_blocks.1.0.out_layers.0.bias",
    "encoder.1.0.layer2.3.weight": "input_blocks.1.0.out_layers.3.weight",
    "encoder.4.0.shortcut.weight": "input_blocks.4.0.skip_connection.weight",
    "encoder.1.1.norm1.weight": "input_blocks.1.1.norm.weight",
    "encoder.1.1.conv1.weight": "input_blocks.1.1.proj_in.weight",
    "encoder.1.1.conv2.bias": "input_blocks.1.1.proj_out.bias",
    "encoder.2.1.blocks.0.norm1.weight": "input_blocks.2.1.transformer_blocks.0.norm1.weight",
    "encoder.2.1.blocks.0.self_attn.q.weight": "input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
    "encoder.2.1.blocks.0.self_attn.k.weight": "input_blocks.2.1.transformer_blocks.0.attn1.to_k.weight",
    "encoder.2.1.blocks.0.self_attn.v.weight": "input_blocks.2.1.transformer_blocks.0.attn1.to_v.weight",
    "encoder.2.1.blocks.0.self_attn.o.bias": "input_blocks.2.1.transformer_blocks.0.attn1.to_out.0.bias",
    "encoder.2.1.blocks.0.cross_attn.k.weight": "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
    "encoder.2.1.blocks.0.ffn.0.proj.weight": "input_blocks.2.1.transformer_blocks.0.ff.net.0.proj.weight",
    "encoder.2.1.blocks.0.ffn.2.bias": "input_blocks.2.1.transformer_blocks.0.ff.net.2.bias",
    "encoder.3.weight": "input_blocks.3.0.op.weight",
    "encoder.9.bias": "input_blocks.9.0.op.bias",
    "encoder.11.0.layer1.2.weight": "input_blocks.11.0.in_layers.2.weight",
    "middle.0.layer1.0.weight": "middle_block.0.in_layers.0.weight",
    "middle.1.blocks.0.self_attn.q.weight": "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    "middle.2.layer2.3.bias": "middle_block.2.out_layers.3.bias",
    "decoder.0.0.shortcut.weight": "output_blocks.0.0.skip_connection.weight",
    "decoder.2.1.1.weight": "output_blocks.2.1.conv.weight",
    "decoder.5.2.1.bias": "output_blocks.5.2.conv.bias",
    "decoder.8.2.1.weight": "output_blocks.8.2.conv.weight",
    "decoder.5.1.conv1.weight": "output_blocks.5.1.proj_in.weight",
    "decoder.11.1.blocks.0.cross_attn.o.weight": "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight",
}


def digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}|".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def official():
    return fx.tiny_official_state_dict()


@pytest.fixture(scope="module")
def weights(official):
    return fw.official_to_comfy(official, "tiny")


@pytest.fixture(scope="module")
def files():
    return fx.write_tiny_checkpoints()


def assert_same(a: fw.FlashFaceWeights, b: fw.FlashFaceWeights, cast=None):
    cast = cast or (lambda t: t)
    for part in ("unet", "reference"):
        da, db = getattr(a, part), getattr(b, part)
        assert list(da) == list(db) or set(da) == set(db)
        for k in da:
            assert torch.equal(cast(da[k]), db[k]), f"{part} {k}"
    assert set(a.extra_attention) == set(b.extra_attention)
    for block, params in a.extra_attention.items():
        for p, t in params.items():
            assert torch.equal(cast(t), b.extra_attention[block][p]), f"{block} {p}"


# --- the mapping ----------------------------------------------------------------------------

def test_spot_checks_hand_written_names(official, weights):
    for old, new in SPOT_CHECKS.items():
        assert torch.equal(weights.unet[new], official[old]), old
        if old.startswith(("encoder.", "decoder.")):
            assert torch.equal(weights.reference[new], official["ref_" + old]), old


def test_every_tensor_lands_once_by_value(official, weights):
    """A bijection by content, independent of the renaming rules: each main-UNet tensor of the
    checkpoint is in ``unet`` exactly once with the same shape, each ref_encoder/ref_decoder
    tensor in ``reference``, each self_attn_first tensor in ``extra_attention``."""
    def by_value(tensors):
        out = {}
        for t in tensors:
            out.setdefault(digest(t), 0)
            out[digest(t)] += 1
        return out

    groups = {"unet": [], "reference": [], "extra": []}
    for k, v in official.items():
        if k.startswith(("ori_", "ref_middle.")):
            continue
        group = "reference" if k.startswith("ref_") else "extra" if "self_attn_first" in k else "unet"
        groups[group].append(v)
    extra = [t for params in weights.extra_attention.values() for t in params.values()]
    assert by_value(weights.unet.values()) == by_value(groups["unet"])
    assert by_value(weights.reference.values()) == by_value(groups["reference"])
    assert by_value(extra) == by_value(groups["extra"])


def test_extra_attention_blocks_and_params(official, weights):
    assert sorted(weights.extra_attention) == sorted(BLOCKS_WITH_EXTRA)
    for block, params in weights.extra_attention.items():
        assert set(params) == set(fw.ATTENTION_PARAMS)
    first = weights.extra_attention[("output", 7, 0)]
    assert torch.equal(first["to_q.weight"], official["decoder.7.1.blocks.0.self_attn.self_attn_first.q.weight"])
    assert torch.equal(first["to_out.0.bias"], official["decoder.7.1.blocks.0.self_attn.self_attn_first.o.bias"])
    middle = weights.extra_attention[("middle", 0, 0)]
    assert torch.equal(middle["to_v.weight"], official["middle.1.blocks.0.self_attn.self_attn_first.v.weight"])


def test_conv_in_channels_and_scope(weights):
    assert weights.unet["input_blocks.0.0.weight"].shape[1] == 5
    assert weights.reference["input_blocks.0.0.weight"].shape[1] == 4
    assert all(k.startswith(("input_blocks.", "output_blocks.")) for k in weights.reference)
    assert not any("self_attn_first" in k or k.startswith(("ori_", "ref_")) for k in weights.unet)


def test_full_size_shapes_on_meta():
    w = fw.official_to_comfy(fx.full_official_state_dict_meta(), "full (meta)")
    assert tuple(w.unet["input_blocks.0.0.weight"].shape) == (320, 5, 3, 3)
    assert tuple(w.reference["input_blocks.0.0.weight"].shape) == (320, 4, 3, 3)
    assert round(fw._millions(w.unet.values())) == 860  # SD1.5's UNet, plus one input channel
    assert sorted(w.extra_attention) == sorted(BLOCKS_WITH_EXTRA)
    widths = {block: params["to_q.weight"].shape[0] for block, params in w.extra_attention.items()}
    assert widths[("middle", 0, 0)] == 1280
    assert [widths[("output", n, 0)] for n in range(3, 12)] == [1280] * 3 + [640] * 3 + [320] * 3


def test_wrapped_state_dict(tmp_path, official):
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": official, "epoch": 3}, path)
    assert set(fw.read_checkpoint(path)) == set(official)


def test_progress_reaches_the_total(official):
    calls = []
    fw.official_to_comfy(official, "tiny", progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(official), len(official))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# --- files ----------------------------------------------------------------------------------

def test_ckpt_and_safetensors_give_the_same_weights(files, weights):
    from_ckpt = fw.load_flashface(files["ckpt"])
    from_st = fw.load_flashface(files["safetensors"])
    assert_same(from_ckpt, from_st)
    assert_same(from_ckpt, weights)
    assert from_ckpt.source == files["ckpt"].name


def test_ckpt_is_memory_mapped(files):
    sd = fw.read_checkpoint(files["ckpt"])
    assert isinstance(sd, dict) and len(sd) > 2000
    assert isinstance(fw.read_checkpoint(files["safetensors"]), fw.LazySafetensors)


def test_convert_round_trip_fp16_and_size(tmp_path, files, weights):
    dst = fw.convert(files["ckpt"], tmp_path / "ff.safetensors")
    back = fw.load_flashface(dst)
    assert_same(weights, back, cast=lambda t: t.to(torch.float16))
    assert all(t.dtype == torch.float16 for t in back.unet.values())
    count = len(weights.unet) + len(weights.reference) + 5 * len(weights.extra_attention)
    data = 2 * sum(t.numel() for _, t in fw.converted_tensors(weights))
    with open(dst, "rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_size))
    assert len(header) - 1 == count
    assert dst.stat().st_size == 8 + header_size + data
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata()["format"] == "idfusion-flashface" and f.metadata()["version"] == "1"
        assert "extra_attention.output.3.0.to_q.weight" in set(f.keys())
        assert "unet.input_blocks.0.0.weight" in set(f.keys())
    again = fw.convert(dst, tmp_path / "again.safetensors")
    assert_same(back, fw.load_flashface(again))
    assert not list(tmp_path.glob("*.tmp"))


def test_convert_refuses_to_overwrite_its_source(files, tmp_path):
    src = tmp_path / "x.safetensors"
    shutil.copy(files["safetensors"], src)
    with pytest.raises(ValueError, match="same file"):
        fw.convert(src, src)


def test_cli_from_a_copy_with_any_folder_name(tmp_path, files):
    clone = tmp_path / "some clone name"
    for rel in ("models/__init__.py", "models/files.py", "models/flashface/__init__.py", "models/flashface/weights.py",
                "tools/convert_flashface.py", "tools/pack_models.py"):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, clone / rel)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    dst = tmp_path / "out.safetensors"
    run = subprocess.run([sys.executable, str(clone / "tools" / "convert_flashface.py"), str(files["ckpt"]), str(dst)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    assert "reading" in run.stderr and "writing" in run.stderr and "100%" in run.stderr
    assert fw.read_metadata(dst)["format"] == "idfusion-flashface"
    again = subprocess.run([sys.executable, "-m", "tools.convert_flashface", str(files["ckpt"]), str(dst)],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--force" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "tools.convert_flashface", str(tmp_path / "nope.ckpt"),
                          str(tmp_path / "x.safetensors")], cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "not found" in bad.stderr and "models/flashface" in bad.stderr


# --- errors -----------------------------------------------------------------------------------

def sd15_layout() -> dict[str, torch.Tensor]:
    return {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "model.diffusion_model.out.2.bias": torch.zeros(4),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2, 1, 1),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}


def test_plain_sd15_checkpoint_is_refused_with_advice(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file(sd15_layout(), str(path))
    with pytest.raises(ValueError) as e:
        fw.load_flashface(path)
    msg = str(e.value)
    for part in ("sd15.safetensors", "ref_encoder.*", "self_attn_first", "model.diffusion_model.*",
                 "first_stage_model.decoder.*", "models/checkpoints", "flashface.ckpt", "tools/convert_flashface.py",
                 "models/flashface"):
        assert part in msg, part


def test_lora_and_random_safetensors_are_refused(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(ValueError, match="LoRA"):
        fw.load_flashface(lora)
    rnd = tmp_path / "random.safetensors"
    save_file({f"w{i}.x": torch.randn(3) for i in range(3)}, str(rnd))
    with pytest.raises(ValueError, match=r"found 3 tensors with key prefixes w0\.x\.\*"):
        fw.load_flashface(rnd)


@pytest.mark.parametrize("name,content", [("empty.ckpt", b""), ("empty.safetensors", b""),
                                          ("noise.ckpt", bytes(range(256)) * 4), ("noise.safetensors", bytes(range(256)) * 4)])
def test_unreadable_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{name}.*models/flashface"):
        fw.load_flashface(path)


class _Trap:
    """Unpickling this would create a file: weights-only loading must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "trap.ckpt"
    torch.save({"x": _Trap(marker)}, path)
    with pytest.raises(ValueError, match="holds pickled objects other than tensors; loading them is unsafe"):
        fw.load_flashface(path)
    assert not marker.exists()


def test_ori_copy_that_differs_is_named(official):
    sd = dict(official)
    sd["ori_decoder.4.1.blocks.0.self_attn.self_attn_first.k.weight"] = sd[
        "decoder.4.1.blocks.0.self_attn.self_attn_first.k.weight"] + 1
    sd["ori_encoder.0.weight"] = sd["ref_encoder.0.weight"]
    with pytest.raises(ValueError) as e:
        fw.official_to_comfy(sd, "bad.ckpt")
    msg = str(e.value)
    assert "2 differ" in msg and "ori_encoder.0.weight vs encoder.0.weight" in msg
    assert "ori_decoder.4.1.blocks.0.self_attn.self_attn_first.k.weight" in msg


def test_missing_ori_copies_are_fine(official, weights):
    assert_same(fw.official_to_comfy({k: v for k, v in official.items() if not k.startswith("ori_")}), weights)


def test_unknown_official_key_is_named(official):
    with pytest.raises(ValueError, match=r"decoder\.3\.0\.mystery\.weight"):
        fw.official_to_comfy({**official, "decoder.3.0.mystery.weight": torch.zeros(1)})


def test_structure_checks(official):
    no_extra = {k: v for k, v in official.items() if "decoder.9.1.blocks.0.self_attn.self_attn_first" not in k}
    with pytest.raises(ValueError, match="extra attentions for blocks"):
        fw.official_to_comfy(no_extra)
    four_channels = {**official, "encoder.0.weight": official["ref_encoder.0.weight"]}
    four_channels.pop("ori_encoder.0.weight")
    with pytest.raises(ValueError, match="5 input channels"):
        fw.official_to_comfy(four_channels)


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="models/flashface"):
        fw.load_flashface(tmp_path / "flashface.ckpt")
    other = tmp_path / "flashface.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.bin'"):
        fw.load_flashface(other)


def test_newer_converted_version_is_refused(tmp_path, weights):
    path = tmp_path / "v2.safetensors"
    fw.write_safetensors(list(fw.converted_tensors(weights)), path,
                         {"format": "idfusion-flashface", "version": "2"}, torch.float16)
    with pytest.raises(ValueError, match="version '2'"):
        fw.load_flashface(path)


def test_layout_readers_refuse_the_other_layout(official, weights):
    converted = dict(fw.converted_tensors(weights))
    with pytest.raises(ValueError, match="converted FlashFace layout where the official one"):
        fw.official_to_comfy(converted)
    with pytest.raises(ValueError, match="official FlashFace layout where the converted one"):
        fw.converted_to_comfy(official)
    assert_same(fw.converted_to_comfy(converted), weights)
