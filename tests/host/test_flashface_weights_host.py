"""FlashFace weights against the real ComfyUI UNet (in process, CPU).

The synthetic checkpoint has the official key names and shapes (written after the official
code in tests/idf_testlib/flashface_fixtures.py); these tests load the mapped weights
strictly into ComfyUI's own SD1.5 UNet and compare outputs with the official layout's
forward pass.
"""
import pytest
import torch

from idf_testlib import flashface_fixtures as fx
from idf_testlib.models import SD15_TINY, sd15_unet_config

BLOCKS_WITH_EXTRA = [("middle", 0, 0)] + [("output", n, 0) for n in range(3, 12)]


@pytest.fixture(scope="module")
def fw(host):
    from IDFusion.models.flashface import weights as flashface_weights
    return flashface_weights


@pytest.fixture(scope="module")
def modules(host):
    """(main, reference): the official-layout modules the tiny checkpoint is made from."""
    return fx.official_flashface_modules(**fx.TINY, seed=0)


@pytest.fixture(scope="module")
def weights(fw, modules):
    return fw.official_to_comfy(fx.official_state_dict(*modules), "tiny")


def comfy_unet(in_channels: int, device=None, **widths):
    """ComfyUI's SD1.5 UNetModel (weights unset), built through comfy.supported_models.SD15."""
    import comfy.supported_models
    config = comfy.supported_models.SD15(sd15_unet_config(in_channels=in_channels, **widths))
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({}, device=device).diffusion_model


def inputs(in_channels: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, in_channels, 16, 16, generator=gen)
    t = torch.tensor([999.0, 250.0])
    context = torch.randn(2, 5, SD15_TINY["context_dim"], generator=gen)
    return x, t, context


def test_main_unet_loads_strictly_and_matches_the_official_forward(weights, modules):
    unet = comfy_unet(5, **SD15_TINY)
    result = unet.load_state_dict(weights.unet, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, weights.unet[name]), name
    x, t, context = inputs(5)
    expected = modules[0](x, t, context)
    got = unet(x, timesteps=t, context=context)
    # ComfyUI's resblock GroupNorm uses eps 1e-5, the official one 1e-6.
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_reference_network_loads_into_a_4_channel_unet(weights, modules):
    main, reference = modules
    unet = comfy_unet(4, **SD15_TINY)
    for part in ("input_blocks", "output_blocks"):
        own = {k[len(part) + 1:]: v for k, v in weights.reference.items() if k.startswith(part + ".")}
        getattr(unet, part).load_state_dict(own, strict=True)
    shared = {k: v for k, v in weights.unet.items() if not k.startswith(("input_blocks.", "output_blocks."))}
    unet.load_state_dict({**shared, **weights.reference}, strict=True)
    # The reference network as FlashFace runs it: its own encoder/decoder, the main UNet's
    # time embedding, middle and head.
    reference.time_embedding, reference.middle, reference.head = main.time_embedding, main.middle, main.head
    x, t, context = inputs(4)
    expected = reference(x, t, context)
    torch.testing.assert_close(unet(x, timesteps=t, context=context), expected,
                               rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_extra_attention_fits_each_middle_and_decoder_transformer(weights):
    from comfy.ldm.modules.attention import BasicTransformerBlock
    unet = comfy_unet(5, **SD15_TINY)
    blocks = {}
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            part, number = name.split(".")[:2]
            key = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[part]
            blocks[(key, 0 if key == "middle" else int(number), int(name.rsplit(".", 1)[1]))] = module.attn1
    assert sorted(k for k in blocks if k[0] != "input") == sorted(BLOCKS_WITH_EXTRA)
    assert sorted(weights.extra_attention) == sorted(BLOCKS_WITH_EXTRA)
    for key, params in weights.extra_attention.items():
        own = dict(blocks[key].named_parameters())
        assert {p: tuple(v.shape) for p, v in params.items()} == {p: tuple(v.shape) for p, v in own.items()}, key


def test_full_size_mapping_matches_comfyui_sd15_on_meta(fw):
    w = fw.official_to_comfy(fx.full_official_state_dict_meta(), "full (meta)")
    main = comfy_unet(5, device=torch.device("meta")).state_dict()
    assert {k: tuple(v.shape) for k, v in w.unet.items()} == {k: tuple(v.shape) for k, v in main.items()}
    four = comfy_unet(4, device=torch.device("meta")).state_dict()
    expected = {k: tuple(v.shape) for k, v in four.items() if k.startswith(("input_blocks.", "output_blocks."))}
    assert {k: tuple(v.shape) for k, v in w.reference.items()} == expected
    assert sorted(w.extra_attention) == sorted(BLOCKS_WITH_EXTRA)
    for (block, number, index), params in w.extra_attention.items():
        prefix = "middle_block.1" if block == "middle" else f"output_blocks.{number}.1"
        for p, v in params.items():
            assert v.shape == main[f"{prefix}.transformer_blocks.{index}.attn1.{p}"].shape


def test_converted_file_loads_strictly(fw, weights, tmp_path):
    files = fx.write_tiny_checkpoints()
    back = fw.load_flashface(fw.convert(files["safetensors"], tmp_path / "ff.safetensors"))
    unet = comfy_unet(5, **SD15_TINY)
    unet.load_state_dict({k: v.float() for k, v in back.unet.items()}, strict=True)
    for name, tensor in back.unet.items():
        assert torch.equal(tensor, weights.unet[name].half()), name


def test_comfyui_sd15_checkpoint_is_refused(fw, tmp_path):
    """A real ComfyUI-saved SD1.5 checkpoint layout (tiny widths)."""
    import comfy.utils
    from idf_testlib.models import checkpoint_state_dict, tiny_sd15
    path = tmp_path / "sd15-tiny.safetensors"
    comfy.utils.save_torch_file(checkpoint_state_dict(tiny_sd15()), str(path))
    with pytest.raises(ValueError, match=r"model\.diffusion_model\.\*.*models/checkpoints.*models/flashface"):
        fw.load_flashface(path)
