"""ConsistentID nodes: the released weights, a person's face encoding, the facial-region prompt with
the delayed merge, and the MODEL patch (LoRA + ID tokens in every cross-attention)."""
from __future__ import annotations

import logging

import folder_paths

from ..models.consistentid.checkpoint import EXTENSIONS, FOLDER
from . import types
from .api import io, ui
from .loaders import register_folder
from .reference import build_routing, check_patch_inputs, routing_inputs
from .unet_blocks import (attention_processors, attn2_replace, set_attn2_replace, set_outer_sample_wrapper,
                          transformer_blocks)

logger = logging.getLogger("IDFusion")

CLIP_VISION_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"

register_folder(FOLDER, EXTENSIONS)


class ConsistentIDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionConsistentIDLoader",
            display_name="IDFusion ConsistentID Loader",
            category="IDFusion/loaders",
            description="Loads a ConsistentID checkpoint (ConsistentID-v1.bin for SD1.5, ConsistentID_SDXL-v1.bin, "
                        "or a .safetensors made by tools/convert_consistentid.py) from models/consistentid/, read "
                        "safely.",
            inputs=[io.Combo.Input("weights", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A ConsistentID file in models/consistentid/.")],
            outputs=[types.ConsistentID.Output(display_name="consistentid",
                                               tooltip="The FacialEncoder, ID projection, LoRA and ID-token layers.")],
        )

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        from ..models.consistentid.weights import load
        path = folder_paths.get_full_path(FOLDER, weights)
        if path is None:
            raise FileNotFoundError(f"IDFusionConsistentIDLoader: weights '{weights}' is not in models/{FOLDER}; put "
                                    f"ConsistentID-v1.bin there and refresh the node list")
        return io.NodeOutput(load(path))


class ConsistentIDFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..models.consistentid.face import ARCFACE_ORDERS, ARCFACE_RGB, NO_FACE_CHOICES, NO_FACE_ERROR
        return io.Schema(
            node_id="IDFusionConsistentIDFace",
            display_name="IDFusion ConsistentID Face",
            category="IDFusion/consistentid",
            description="Encodes one photo of a person as ConsistentID does: ArcFace (insightface buffalo_l), BiSeNet "
                        "facial regions (skin, eyes, ears, nose, lips) composited on black, CLIP-ViT-H states of the "
                        "photo and each region, then the ID tokens and the region vectors. Cached by content.",
            inputs=[
                types.ConsistentID.Input("consistentid", tooltip="From 'IDFusion ConsistentID Loader'."),
                types.FaceAnalyzer.Input("analyzer", tooltip="From 'IDFusion Face Analysis Loader': pack buffalo_l, "
                                                             "det_size 640, as ConsistentID uses it."),
                types.FaceParser.Input("parser", tooltip="From 'IDFusion Face Parsing Loader': facexlib's "
                                                         "parsing_bisenet.pth or ConsistentID's face_parsing.pth."),
                io.Image.Input("image", tooltip="One photo of the person (the whole photo, no crop)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip=f"Load CLIP Vision with {CLIP_VISION_FILE} (CLIP-ViT-H-14 laion2B)."),
                io.String.Input("label", default="person", tooltip="A name shown in logs."),
                io.Combo.Input("arcface_input", options=list(ARCFACE_ORDERS), default=ARCFACE_RGB,
                               tooltip="Channel order insightface receives: the official SD1.5 inference passes RGB "
                                       "(its training passed BGR, insightface's own convention)."),
                io.Combo.Input("no_face", options=list(NO_FACE_CHOICES), default=NO_FACE_ERROR,
                               tooltip="A photo without a detectable face: stop with an error, or use a zero ArcFace "
                                       "embedding as the official code does."),
            ],
            outputs=[
                types.ConsistentIDFaces.Output("faces", display_name="faces",
                                               tooltip="The person's ConsistentID encoding."),
                io.Image.Output("preview", display_name="regions preview",
                                tooltip="The photo with the facial regions found, in colour."),
                io.Image.Output("region_images", display_name="region images",
                                tooltip="Each region composited on black, as CLIP vision saw it."),
            ],
        )

    @classmethod
    def execute(cls, consistentid, analyzer, parser, image, label, arcface_input, no_face,
                clip_vision=None) -> io.NodeOutput:
        from ..models.consistentid.face import ConsistentIDFaces, encode_cached
        from ..models.faces.analysis import to_rgb_uint8
        node = "IDFusionConsistentIDFace"
        if clip_vision is None:
            raise ValueError(f"{node}: 'clip_vision' is not connected; add a Load CLIP Vision node with "
                             f"{CLIP_VISION_FILE} (models/clip_vision/) and connect it")
        if image.ndim == 4 and image.shape[0] != 1:
            raise ValueError(f"{node}: 'image' holds {image.shape[0]} photos; ConsistentID encodes one photo per "
                             f"person (pick one with an Image From Batch node)")
        if analyzer.name != "buffalo_l":
            logger.warning("%s: the face analyzer is '%s'; ConsistentID was trained with buffalo_l's ArcFace", node,
                           analyzer.name)
        rgb = to_rgb_uint8(image[0] if image.ndim == 4 else image, f"{node}: 'image'")
        encoded = encode_cached(consistentid, clip_vision, analyzer, parser, rgb, label, arcface_input, no_face, node)
        faces = ConsistentIDFaces(consistentid, (encoded.face,), (1.0,))
        return io.NodeOutput(faces, encoded.preview, encoded.crops, ui=ui.PreviewImage(encoded.preview, cls=cls))


class ConsistentIDCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        slots = []
        for i in range(1, 5):
            optional = i > 2
            slots += [
                types.ConsistentIDFaces.Input(f"faces_{i}", optional=optional,
                                              tooltip=f"Person {i} (from 'IDFusion ConsistentID Face')."
                                                      + (" Optional." if optional else "")),
                io.Float.Input(f"weight_{i}", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip=f"Mixing weight of person {i} (normalised to sum 1). With identity masks, "
                                       f"person {i} is mask {i}."),
            ]
        return io.Schema(
            node_id="IDFusionConsistentIDCombine",
            display_name="IDFusion ConsistentID Combine",
            category="IDFusion/consistentid",
            description="Several people for 'IDFusion ConsistentID Apply': mixed by weight (their ArcFace embeddings "
                        "and CLIP states blended), one per batch item, or one per region with identity masks.",
            inputs=slots,
            outputs=[types.ConsistentIDFaces.Output("faces", display_name="faces",
                                                    tooltip="The people, in input order.")],
        )

    @classmethod
    def execute(cls, weight_1, weight_2, weight_3, weight_4, faces_1, faces_2, faces_3=None,
                faces_4=None) -> io.NodeOutput:
        from ..models.consistentid.face import ConsistentIDFaces
        given = [(f, w) for f, w in ((faces_1, weight_1), (faces_2, weight_2), (faces_3, weight_3),
                                      (faces_4, weight_4)) if f is not None]
        weights = given[0][0].weights
        people, mix = [], []
        for index, (faces, weight) in enumerate(given, start=1):
            if faces.weights.digest != weights.digest:
                raise ValueError(f"IDFusionConsistentIDCombine: faces_{index} was encoded with {faces.weights.name}, "
                                 f"faces_1 with {weights.name}; encode every person with the same ConsistentID file")
            people += faces.faces
            mix += [weight * float(w) for w in faces.mix()]
        if sum(mix) <= 0:
            raise ValueError("IDFusionConsistentIDCombine: all weights are 0; give at least one person a weight > 0")
        return io.NodeOutput(ConsistentIDFaces(weights, tuple(people), tuple(mix)))


class ConsistentIDConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionConsistentIDConditioning",
            display_name="IDFusion ConsistentID Conditioning",
            category="IDFusion/consistentid",
            description="ConsistentID's prompts: the text-only prompt until the merge step, then the facial prompt "
                        "(prompt + 'Detail:' + the caption with each facial noun fused with its region vector); the "
                        "negative fused with the unconditional region vectors. The exact merge step needs the MODEL "
                        "from 'IDFusion ConsistentID Apply'.",
            inputs=[
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (SD1.5)."),
                types.ConsistentID.Input("consistentid", tooltip="From 'IDFusion ConsistentID Loader'."),
                types.ConsistentIDFaces.Input("faces", tooltip="ONE person's encoding (from 'IDFusion ConsistentID "
                                                               "Face'). Several people: one node per person."),
                io.String.Input("text", multiline=True, default="", tooltip="The prompt, as plain text (no weight "
                                                                           "syntax: it is tokenised as the official "
                                                                           "code does)."),
                io.String.Input("negative", multiline=True, default="", tooltip="The negative prompt."),
                io.Float.Input("merge_at", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Steps i <= round(merge_at·N) (0-based) of N use the text-only prompt, later "
                                       "steps the facial one. Official: step 30 of 50, i.e. 0.6."),
                io.Int.Input("person", default=1, min=1, max=8,
                             tooltip="With identity_masks: which region is this person's (1 = the first)."),
                types.IdentityMasks.Input("identity_masks", optional=True,
                                          tooltip="Several people: restrict this person's prompt to their region "
                                                  "(from 'IDFusion Multi-ID Masks'); add a scene prompt for the rest."),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive",
                                       tooltip="Text-only, then facial prompt (switching at the merge step)."),
                io.Conditioning.Output("negative_out", display_name="negative",
                                       tooltip="The negative prompt fused with the unconditional region vectors."),
                io.String.Output("facial_prompt", display_name="facial prompt",
                                 tooltip="The facial prompt as tokenised, with its <|facial|> markers."),
            ],
        )

    @classmethod
    def execute(cls, clip, consistentid, faces, text, negative, merge_at, person,
                identity_masks=None) -> io.NodeOutput:
        from ..models.consistentid import merge
        from ..models.consistentid import text as text_side
        node = "IDFusionConsistentIDConditioning"
        face = _one_face(node, consistentid, faces)
        if consistentid.variant != "SD1.5":
            raise ValueError(f"{node}: {consistentid.name} is the {consistentid.variant} release; this node builds the "
                             f"SD1.5 release's prompts only (the SDXL text side is not implemented)")
        try:
            tokenizer = text_side.Tokenizer(clip)
        except ValueError as error:
            raise ValueError(f"{node}: 'clip': {error}; connect an SD1.5 checkpoint's CLIP") from None
        tokens = text_side.prompt_tokens(tokenizer, text, face.regions)
        text_only, pooled = text_side.encode_ids(clip, tokenizer, tokens.text_only_ids)
        if text_only.shape[-1] != consistentid.text_width:
            raise ValueError(f"{node}: 'clip' gives {text_only.shape[-1]}-wide features but {consistentid.name} "
                             f"expects {consistentid.text_width}; connect the CLIP of the SD1.5 checkpoint")
        fuse_module = consistentid.loaded_encoders().facial_encoder.fuse_module
        hidden, _ = text_side.encode_ids(clip, tokenizer, tokens.facial_ids)
        facial = text_side.fuse(fuse_module, hidden, tokens.marks, face.region_vectors)
        negative_hidden, negative_pooled = text_side.encode_ids(clip, tokenizer, tokenizer.prompt(negative))
        uncond = face.uncond_vector.expand(len(tokens.marks), -1)
        fused_negative = text_side.fuse(fuse_module, negative_hidden, tokens.marks, uncond)
        positive = merge.conditioning(text_only, facial, pooled, merge_at)
        if identity_masks is not None:
            positive = _in_region(node, positive, identity_masks, person)
        negative_cond = [[fused_negative, {} if negative_pooled is None else {"pooled_output": negative_pooled}]]
        pairs = ", ".join(f"{noun}←{region}" for noun, region in text_side.pairing(face.regions))
        logger.info("%s: '%s' (%s), merge at %.3f", node, tokens.prompt_face, pairs, merge_at)
        return io.NodeOutput(positive, negative_cond, tokens.prompt_face)


def _in_region(node: str, conditioning: list, identity_masks, person: int) -> list:
    """Each cond restricted to the person's region, as Conditioning (Set Mask) restricts it."""
    if person > identity_masks.count:
        raise ValueError(f"{node}: person is {person} but 'identity_masks' has {identity_masks.count} region(s); "
                         f"choose 1–{identity_masks.count}")
    mask = identity_masks.masks[person - 1:person]
    return [[c, {**extra, "mask": mask, "set_area_to_bounds": False, "mask_strength": 1.0}]
            for c, extra in conditioning]


def _one_face(node: str, consistentid, faces):
    _same_weights(node, consistentid, faces)
    if faces.count != 1:
        raise ValueError(f"{node}: 'faces' holds {faces.count} people; the facial prompt describes one person: connect "
                         f"one person's 'IDFusion ConsistentID Face' (several people: one Conditioning node each, "
                         f"with 'identity_masks' and 'person')")
    return faces.faces[0]


class ConsistentIDApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionConsistentIDApply",
            display_name="IDFusion ConsistentID Apply",
            category="IDFusion/consistentid",
            description="Patches a clone of the MODEL with ConsistentID: its LoRA on every attention (merged into the "
                        "weights by ComfyUI) and the person's ID tokens in every cross-attention "
                        "(+ strength·Attn(q, K_id, V_id)); also makes the ConsistentID Conditioning's merge step "
                        "exact.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 MODEL (ConsistentID-v1) or SDXL MODEL (the SDXL file)."),
                types.ConsistentID.Input("consistentid", tooltip="From 'IDFusion ConsistentID Loader'."),
                types.ConsistentIDFaces.Input("faces", tooltip="From 'IDFusion ConsistentID Face' or "
                                                               "'IDFusion ConsistentID Combine'."),
                io.Float.Input("id_strength", default=1.0, min=0.0, max=3.0, step=0.01,
                               tooltip="Scale of the ID-token attention (official: 1). 0 = no ID tokens."),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Strength of ConsistentID's LoRA on all attentions (official: 1). 0 = none."),
                *routing_inputs(who="people", one="person"),
            ],
            outputs=[io.Model.Output(display_name="patched model",
                                     tooltip="The patched clone; the input MODEL is untouched.")],
        )

    @classmethod
    def execute(cls, model, consistentid, faces, id_strength, lora_strength, identity_mode, outside,
                identity_masks=None) -> io.NodeOutput:
        from ..models.consistentid.merge import WRAPPER_KEY, merge_wrapper
        from ..models.consistentid.patch import IDTokens
        from ..models.consistentid.unet import check_model, faces_tokens, lora_patches
        from ..models.engine import MODE_MIX
        node = "IDFusionConsistentIDApply"
        check_patch_inputs(node, model, 0.0, 1.0)
        _same_weights(node, consistentid, faces)
        routing = build_routing(node, faces, identity_mode, identity_masks, outside)
        processors = attention_processors(model)
        check_model(consistentid, processors, transformer_blocks(model.model.diffusion_model), node)
        m = model.clone()
        if lora_strength != 0:
            m.add_patches(lora_patches(m, consistentid, processors), lora_strength)
        mixed = identity_mode == MODE_MIX
        layers = {key: str(i) for i, (_, key, attn) in enumerate(processors) if attn == "attn2"}
        mix = faces.mix().new_ones(1) if mixed else faces.mix()                   # a mix is one set of tokens
        spec = IDTokens(consistentid.adapter, layers, faces_tokens(faces, mixed), faces.faces[0].uncond_id_tokens,
                        id_strength, identity_mode, mix, routing.masks, outside)
        patch_id_tokens(m, spec)
        set_outer_sample_wrapper(m, WRAPPER_KEY, merge_wrapper)
        return io.NodeOutput(m)


def _same_weights(node: str, consistentid, faces) -> None:
    if faces.weights.digest != consistentid.digest:
        raise ValueError(f"{node}: 'faces' was encoded with {faces.weights.name} but 'consistentid' is "
                         f"{consistentid.name}; use the same ConsistentID file for both")


def patch_id_tokens(m, spec) -> None:
    """Add the spec's ID tokens to every cross-attention, wrapping any attn2 replace patch already there."""
    from ..models.consistentid.patch import IDTokenAttention
    for key in spec.layers:
        existing = attn2_replace(m, key)
        if isinstance(existing, IDTokenAttention):
            patch = existing.with_spec(spec)
        else:
            patch = IDTokenAttention(key, (spec,), inner=existing)
        set_attn2_replace(m, patch, key)


NODES = [ConsistentIDLoader, ConsistentIDFace, ConsistentIDCombine, ConsistentIDConditioning, ConsistentIDApply]
