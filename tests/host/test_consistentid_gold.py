"""Gold tests: IDFusion's ConsistentID against the official pipeline re-implemented on the test side
(``idf_testlib/consistentid_official.py``, written from JackAILab/ConsistentID, importing nothing
from the pack), on the same weights file read by its official names.

1. The whole conditioning: one photo through IDFusion's Face and Conditioning nodes, and through
   the official steps (insightface on the RGB array, BiSeNet on the PIL-resized photo, the
   official masks, caption, added-token tokenisation, CLIPImageProcessor, FacialEncoder with five
   slots, ProjPlusModel): ID tokens, unconditional ID tokens, the text-only prompt, the facial
   prompt and the fused negative.
2. One UNet call: ComfyUI's UNet patched by the Apply node (LoRA merged by the host, ID tokens
   through attn2 patches), rows [negative, text-only, facial] as ``calc_cond_batch`` makes them,
   against a diffusers UNet2DConditionModel holding the same UNet weights (through the host's own
   diffusers key map) with the official processors loaded as the official loader loads them
   (``ModuleList(unet.attn_processors.values()).load_state_dict(adapter_modules)``), given the
   official 81-token contexts.

The photo is 224 × 224, so CLIP preprocessing is the identity on both sides; everything runs in
float32. Errors are max |a − b| / max |b|; the largest are written to the artifacts folder
(``consistentid_gold.txt``). Observed: about 1e-6 (conditioning) and 1e-6 (UNet); TOLERANCE
leaves room for summation order and kernels, and each case checks that what it tests moves the
result by far more than that.
"""
import numpy as np
import pytest
import torch

from idf_testlib import consistentid_fixtures as cf
from idf_testlib import consistentid_official as official
from idf_testlib import face_fixtures

TOLERANCE = 1e-4
SIGNAL = 100
PROMPT = ("cinematic photo,A man, in a forest, adventuring, 50mm photograph, half-length portrait, film, bokeh, "
          "professional, 4k, highly detailed")
NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality, blurry((((ugly)))), (((duplicate)))"
TIMESTEP = 500
ERRORS = {}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def record(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    error = relative(a, b)
    ERRORS[name] = error
    from idf_testlib.paths import ARTIFACTS
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "consistentid_gold.txt").write_text("".join(f"{k}: {v:.3g}\n" for k, v in sorted(ERRORS.items())))
    return error


# --- the official side ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_modules(cid_groups):
    proj = official.ProjPlusModel(cross_attention_dim=64, clip_embeddings_dim=64, depth=2)
    proj.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in cid_groups["image_proj"].items()}, strict=True)
    facial = official.FacialEncoder(embedding_dim=64, output_dim=64, embed_dim=64, dim=128, depth=2)
    facial.load_state_dict(cid_groups["FacialEncoder"], strict=True)
    return proj.eval(), facial.eval()


@pytest.fixture(scope="module")
def weights(cid_groups):
    """The ConsistentID file as released (image_proj in bf16), loaded by the pack."""
    from IDFusion.models.consistentid.weights import load
    from idf_testlib.paths import CACHE
    path = cf.write_checkpoint(cid_groups, CACHE / "models" / "consistentid" / "gold-ConsistentID-v1.bin")
    return load(str(path))


@pytest.fixture(scope="module")
def tokenizer(host):
    from pathlib import Path

    import comfy.sd1_clip
    from transformers import CLIPTokenizer
    folder = Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    tok.add_tokens([official.IMAGE_TOKEN], special_tokens=True)
    tok.add_tokens([official.FACIAL_TOKEN], special_tokens=True)
    return tok


def text_encoder(clip, ids) -> torch.Tensor:
    """``text_encoder(ids)[0]`` with the checkpoint's CLIP (the host's own encoder)."""
    return clip.encode_from_tokens({"l": [[(int(i), 1.0) for i in ids]]}, return_dict=True)["cond"].float()


def vision_states(clip_vision, pixel_values) -> torch.Tensor:
    """``image_encoder(pixel_values, output_hidden_states=True).hidden_states[-2]`` (the host's model)."""
    import comfy.model_management
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    return clip_vision.model(pixel_values=pixel_values.float(), intermediate_output=-2)[1].float()


@pytest.fixture(scope="module")
def photo():
    return face_fixtures.scene(224, 224, [face_fixtures.MarkerFace(110, 112, 72, 92, roll=4)], seed=9)


@pytest.fixture(scope="module")
def official_run(official_modules, tokenizer, photo, cid_clip, cid_clip_vision, cid_analyzer):
    """What the official pipeline computes for the photo: {name: tensor}."""
    from facexlib.parsing.bisenet import BiSeNet
    from insightface.app import FaceAnalysis
    from PIL import Image
    from transformers import CLIPImageProcessor
    proj, facial = official_modules
    image = Image.fromarray(photo)
    app = FaceAnalysis(name=str(cid_analyzer.folder), providers=["CPUExecutionProvider"],
                       allowed_modules=["detection", "recognition"])
    app.prepare(ctx_id=0, det_size=(320, 320))
    faces = app.get(np.array(image))
    faceid = torch.from_numpy(faces[0].normed_embedding)[None]
    bisenet = BiSeNet(num_class=19).eval()
    bisenet.load_state_dict(torch.load(cf.parsing_weights(), weights_only=True))
    labels = official.parse(bisenet, image)
    masks = official.key_mask_selection(official.masks_for_unique_values(labels))
    text_only, clean, aligned, facial_mask, valid = official.encode_prompt_with_trigger_word(
        PROMPT, official.CAPTION, masks, tokenizer)
    plain = tokenizer(text_only, padding="max_length", max_length=77, truncation=True).input_ids
    negative = tokenizer(NEGATIVE, padding="max_length", max_length=77, truncation=True).input_ids
    clip_pixels = CLIPImageProcessor()(images=image, return_tensors="pt").pixel_values
    region_pixels = official.facial_clip_images(image, aligned)
    with torch.no_grad():
        whole = vision_states(cid_clip_vision, clip_pixels)
        zero = vision_states(cid_clip_vision, torch.zeros_like(clip_pixels))
        regions = torch.stack([vision_states(cid_clip_vision, p[None])[0] for p in region_pixels])[None]
        uncond_regions = torch.stack([vision_states(cid_clip_vision, torch.zeros_like(p)[None])[0]
                                      for p in region_pixels])[None]
        out = {
            "id_tokens": proj(faceid, whole, shortcut=False),
            "uncond_id_tokens": proj(torch.zeros_like(faceid), zero, shortcut=False),
            "text_only": text_encoder(cid_clip, plain),
            "facial": facial(text_encoder(cid_clip, clean[0].tolist()), regions, facial_mask, valid),
            "negative": facial(text_encoder(cid_clip, negative), uncond_regions, facial_mask, valid),
        }
    out["regions"] = list(aligned)
    return out


# --- IDFusion's side ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def idfusion_run(weights, photo, cid_clip, cid_clip_vision, cid_analyzer, cid_parser):
    from IDFusion.nodes.consistentid import ConsistentIDConditioning, ConsistentIDFace
    image = torch.from_numpy(photo)[None].float() / 255.0
    faces = ConsistentIDFace.execute(weights, cid_analyzer, cid_parser, image, "person", "RGB (official inference)",
                                     "error", clip_vision=cid_clip_vision).result[0]
    positive, negative, _ = ConsistentIDConditioning.execute(cid_clip, weights, faces, PROMPT, NEGATIVE, 0.6,
                                                             1).result
    face = faces.faces[0]
    return {"faces": faces, "id_tokens": face.id_tokens[None], "uncond_id_tokens": face.uncond_id_tokens[None],
            "text_only": positive[0][0], "facial": positive[1][0], "negative": negative[0][0]}


def test_the_regions_are_the_official_ones(official_run, idfusion_run):
    names = {"Face": "Face", "Left_Eye": "Eye", "Right_Eye": "Eye", "Left_Ear": "Ear", "Right_Ear": "Ear",
             "Nose": "Nose", "Upper_Lip": "Lip", "Lower_Lip": "Lip"}
    assert tuple(names[k] for k in official_run["regions"]) == idfusion_run["faces"].faces[0].regions
    assert len(official_run["regions"]) >= 4


@pytest.mark.parametrize("name", ["id_tokens", "uncond_id_tokens", "text_only", "facial", "negative"])
def test_the_conditioning_equals_the_official_pipeline(official_run, idfusion_run, name):
    assert idfusion_run[name].shape == official_run[name].shape
    assert record(f"conditioning {name}", idfusion_run[name], official_run[name]) < TOLERANCE


def test_the_fusion_is_a_large_effect(official_run):
    assert relative(official_run["facial"], official_run["text_only"]) > SIGNAL * TOLERANCE
    assert relative(official_run["id_tokens"], official_run["uncond_id_tokens"]) > SIGNAL * TOLERANCE


# --- one UNet call -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_unet(cid_model, cid_groups):
    """The tiny UNet's weights in a diffusers UNet2DConditionModel with the official processors."""
    import comfy.utils
    unet = cf.diffusers_unet((32, 64, 128, 128), 64)
    mapping = comfy.utils.unet_to_diffusers(cid_model.model.model_config.unet_config)
    comfy_state = cid_model.model.diffusion_model.state_dict()
    unet.load_state_dict({k: comfy_state[v] for k, v in mapping.items() if v in comfy_state}, strict=True)
    names = list(unet.attn_processors)
    unet.set_attn_processor(dict(zip(names, official.adapter_modules(names, (32, 64, 128, 128), 64, 8))))
    torch.nn.ModuleList(unet.attn_processors.values()).load_state_dict(cid_groups["adapter_modules"], strict=True)
    return unet.eval()


def contexts(run) -> torch.Tensor:
    """[negative; text-only; facial] without ID tokens: [3, 77, C]."""
    return torch.cat([run["negative"], run["text_only"], run["facial"]])


def official_eps(unet, run, x_t, t):
    ids = torch.cat([run["uncond_id_tokens"], run["id_tokens"], run["id_tokens"]])
    with torch.no_grad():
        return unet(x_t, t, encoder_hidden_states=torch.cat([contexts(run), ids], dim=1)).sample


def test_one_unet_call_equals_the_official_processors(cid_model, weights, diffusers_unet, official_run, idfusion_run):
    from IDFusion.nodes.consistentid import ConsistentIDApply
    patched = ConsistentIDApply.execute(cid_model, weights, idfusion_run["faces"], 1.0, 1.0, "mix (weights)",
                                        "all").result[0]
    ms = cid_model.model.model_sampling
    sigma = float(ms.sigma(torch.tensor(float(TIMESTEP))))
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * sigma
    eps = cf.unet_eps(patched, x, sigma, contexts(idfusion_run), [1, 0, 0])
    t = ms.timestep(torch.full((3,), sigma)).float()
    assert t.tolist() == [TIMESTEP] * 3
    expected = official_eps(diffusers_unet, official_run, ms.calculate_input(torch.tensor(sigma), x), t)
    assert record("UNet call (negative, text-only, facial rows)", eps, expected) < TOLERANCE
    plain = cf.unet_eps(cid_model, x, sigma, contexts(idfusion_run), [1, 0, 0])
    assert relative(plain, expected) > SIGNAL * TOLERANCE
