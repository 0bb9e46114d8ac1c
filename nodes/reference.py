"""Reference nodes: encode references into features, combine identities, patch the MODEL
with reference attention (FlashFace trained or training-free)."""
from __future__ import annotations

import logging
import os

import folder_paths
import torch
from .api import io

from . import types
from .unet_blocks import (DECODER, SELECTIONS, attn1_replace, block_table, get_option, require_unet,
                          select_blocks, set_apply_model_wrapper, set_attn1_replace, set_option, transformer_blocks)

logger = logging.getLogger("IDFusion")

AUTO = "auto (FlashFace: decoder)"
OUTSIDE_CHOICES = ("all", "none")


def routing_inputs(who: str = "identities", one: str = "identity", where: str = "queries") -> list:
    """identity_mode, outside and identity_masks: the inputs of every node that keeps several
    identities apart (reference attention, fused KV, ConsistentID, DiT reference attention)."""
    from ..models.engine import IDENTITY_MODES, MODE_MIX
    return [
        io.Combo.Input("identity_mode", options=list(IDENTITY_MODES), default=MODE_MIX,
                       tooltip=f"Several {who}: mix them by weight, one per batch item, or one per region "
                               f"(needs identity_masks)."),
        io.Combo.Input("outside", options=list(OUTSIDE_CHOICES), default="all",
                       tooltip=f"By region: {where} outside every region attend to all {who} (mixed by weight) "
                               f"or to none."),
        types.IdentityMasks.Input("identity_masks", optional=True,
                                  tooltip=f"One region per {one}, from 'IDFusion Multi-ID Masks'."),
    ]
DISPLAY_NAME = "IDFusion Reference Attention"
#: Model families by the host's model config class (and its bases), as users know them.
FAMILY_NAMES = {"SD15": "SD1.5", "SD20": "SD2.x", "SDXL": "SDXL", "SDXLRefiner": "SDXL refiner", "SD3": "SD3"}


def disk_cache_folder() -> str:
    """``<user directory>/__idfusion/feature_cache``: a system-user folder (its name starts with "__"),
    which ComfyUI's HTTP userdata API never serves, not even in multi-user mode."""
    system_user = getattr(folder_paths, "get_system_user_directory", None)
    base = system_user("idfusion") if system_user else os.path.join(folder_paths.get_user_directory(), "__idfusion")
    return os.path.join(base, "feature_cache")


def _reference_crops(images, identity) -> tuple[torch.Tensor, str]:
    from ..models.faces.analysis import face_crops

    if (images is None) == (identity is None):
        raise ValueError("IDFusionFaceFeatures: connect exactly one of 'images' (an IMAGE batch of face crops) "
                         "or 'identity' (from 'IDFusion Identity')")
    if identity is not None:
        return identity.crops, identity.label
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"IDFusionFaceFeatures: 'images' is an empty or malformed batch (shape {tuple(images.shape)}); "
                         f"connect 1 or more face crops")
    if images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"IDFusionFaceFeatures: 'images' must be an IMAGE [N, H, W, C], got shape {tuple(images.shape)}")
    return face_crops(images, "IDFusionFaceFeatures: 'images'"), "identity"


CONTEXT_AUTO = "auto (FlashFace: negative prompt; training-free: empty prompt)"
CONTEXT_NEGATIVE = "negative prompt"
CONTEXT_EMPTY = "empty prompt"
CONTEXT_CHOICES = (CONTEXT_AUTO, CONTEXT_NEGATIVE, CONTEXT_EMPTY)


def resolve_context(choice: str, refnet_kind: str) -> str:
    """The reference context a choice means for a ReferenceNet: FlashFace's official reference
    pass runs with the encoded negative prompt; training-free defaults to the empty prompt
    (docs/flashface_official.md says why)."""
    from ..models.references import FLASHFACE
    if choice == CONTEXT_AUTO:
        return CONTEXT_NEGATIVE if refnet_kind == FLASHFACE else CONTEXT_EMPTY
    return choice


def _adm(model_patcher, extra: dict, size: int) -> torch.Tensor | None:
    """The ADM vector of a text encoding (SDXL-style models; its pooled output, sizes of the
    reference crop), None for SD1.5."""
    params = dict(extra, pooled_output=extra.get("pooled_output"), width=size, height=size, crop_w=0, crop_h=0,
                  target_width=size, target_height=size, device="cpu")
    y = model_patcher.model.encode_adm(**params)
    return None if y is None else y.float().cpu()


def _check_width(context: torch.Tensor, model_patcher, what: str) -> None:
    unet = model_patcher.model.diffusion_model
    expected = next(iter(transformer_blocks(unet).values())).attn2.to_k.weight.shape[1]
    if context.shape[-1] != expected:
        raise ValueError(f"IDFusionFaceFeatures: {what} gives {context.shape[-1]}-wide text features but the model "
                         f"expects {expected}; connect the CLIP of the same checkpoint")


def null_context(clip, model_patcher, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The empty prompt's context [1, T, D] and the ADM vector."""
    tokens = clip.tokenize("")
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    context = out.pop("cond").float().cpu()
    _check_width(context, model_patcher, "'clip'")
    return context, _adm(model_patcher, out, size)


def negative_context(negative, model_patcher, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoded negative prompt of a CONDITIONING [1, T, D] and its ADM vector."""
    if not isinstance(negative, list) or len(negative) != 1:
        count = len(negative) if isinstance(negative, list) else "no"
        raise ValueError(f"IDFusionFaceFeatures: 'negative' holds {count} conditionings; the reference pass runs with "
                         f"one text encoding: connect the negative prompt's CLIP Text Encode output itself")
    cond, extra = negative[0]
    if cond.ndim != 3 or cond.shape[0] != 1:
        raise ValueError(f"IDFusionFaceFeatures: 'negative' is a batch of {cond.shape[0]} encodings (shape "
                         f"{tuple(cond.shape)}); connect one negative prompt")
    context = cond.float().cpu()
    _check_width(context, model_patcher, "'negative'")
    return context, _adm(model_patcher, dict(extra), size)


def context_for(choice: str, reference_net, clip, negative, size: int):
    """(context [1, T, D], ADM vector) the reference pass runs with, for the node's inputs."""
    resolved = resolve_context(choice, reference_net.kind)
    why = f"reference_context is '{choice}'" + (f" (with {reference_net.label}: {resolved})"
                                                 if choice == CONTEXT_AUTO else "")
    if resolved == CONTEXT_NEGATIVE:
        if negative is None:
            raise ValueError(f"IDFusionFaceFeatures: {why} but 'negative' is not connected; connect the negative "
                             f"CONDITIONING your sampler or guider gets (FlashFace's reference pass runs with the "
                             f"encoded negative prompt), or set reference_context to '{CONTEXT_EMPTY}'")
        return negative_context(negative, reference_net.model_patcher, size)
    if clip is None:
        raise ValueError(f"IDFusionFaceFeatures: {why} but 'clip' is not connected; connect the checkpoint's CLIP "
                         f"(it encodes the empty prompt), or connect 'negative' and choose '{CONTEXT_NEGATIVE}'")
    return null_context(clip, reference_net.model_patcher, size)


def reference_counts(count: int, n: int, refnet_kind: str) -> tuple[int, ...] | None:
    """How often each of n references counts (0 = auto: FlashFace's four, else once each)."""
    from ..models.references import FLASHFACE, FLASHFACE_REFERENCE_COUNT, cyclic_counts
    if count == 0:
        count = FLASHFACE_REFERENCE_COUNT if refnet_kind == FLASHFACE else n
    return cyclic_counts(n, count)


class FaceFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionFaceFeatures",
            display_name="IDFusion Face Features",
            category="IDFusion/reference",
            description="Encodes one person's reference faces for reference attention and fused keys/values. "
                        "During sampling, one reference pass per step (with the reference context: FlashFace's "
                        "official one is the encoded negative prompt) collects the reference features; they are "
                        "cached by content and context, so repeated runs skip the passes.",
            inputs=[
                types.ReferenceNet.Input("reference_net", tooltip="From 'IDFusion ReferenceNet Loader'."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the reference crops to clean latents."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The checkpoint's CLIP: encodes the empty prompt when the reference context "
                                      "is the empty prompt."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The negative prompt your sampler or guider gets: FlashFace's "
                                              "reference pass runs with it (changing it recomputes the features)."),
                io.Image.Input("images", optional=True,
                               tooltip="Face crops of ONE person (1–N), at least 32 pixels on each side: scaled and "
                                       "padded to a black square (FlashFace's PadToSquare); grayscale is repeated to "
                                       "RGB, RGBA composited on black. Or use 'identity'."),
                types.Identity.Input("identity", optional=True, tooltip="An identity from 'IDFusion Identity' (instead of 'images')."),
                io.Int.Input("size", default=224, min=64, max=1024, step=8,
                             tooltip="Reference crop size in pixels (FlashFace: 224, i.e. 28×28 latents)."),
                io.Boolean.Input("disk_cache", default=False,
                                 tooltip="Also keep reference features on disk (safetensors in ComfyUI's "
                                         "user/__idfusion/feature_cache, a system folder the web API does not serve), "
                                         "so a re-run after a restart skips the reference passes."),
                io.Combo.Input("reference_context", options=list(CONTEXT_CHOICES), default=CONTEXT_AUTO,
                               tooltip="The text the reference pass runs with. FlashFace's official code: the "
                                       "encoded negative prompt (connect 'negative'). Empty prompt: features shared "
                                       "by every negative prompt (needs 'clip')."),
                io.Int.Input("reference_count", default=0, min=0, max=64,
                             tooltip="How many references attention counts: fewer crops are repeated in turn up "
                                     "to this count (weighted, not recomputed). 0 = auto: 4 with FlashFace weights "
                                     "(the official code always attends over four), each crop once training-free."),
            ],
            outputs=[types.ReferenceFeatures.Output(display_name="features",
                                                    tooltip="Feed to 'IDFusion Reference Attention' or 'IDFusion Fused KV'.")],
        )

    @classmethod
    def execute(cls, reference_net, vae, size, disk_cache, reference_context, reference_count, clip=None,
                negative=None, images=None, identity=None) -> io.NodeOutput:
        from ..models.feature_cache import DiskCache
        from ..models.faces.analysis import pad_to_square
        from ..models.references import ReferenceFeatures, ReferenceIdentity

        crops, label = _reference_crops(images, identity)
        context, y = context_for(reference_context, reference_net, clip, negative, size)
        crops = pad_to_square(crops, size)
        base = reference_net.model_patcher.model
        latents = vae.encode(crops)
        channels = base.latent_format.latent_channels
        if latents.shape[1] != channels:
            raise ValueError(f"IDFusionFaceFeatures: 'vae' makes {latents.shape[1]}-channel latents but the model uses "
                             f"{channels}; connect the VAE of the same model family")
        latents = base.latent_format.process_in(latents.float()).cpu()
        counts = reference_counts(reference_count, latents.shape[0], reference_net.kind)
        ident = ReferenceIdentity(label, latents, context, y, DiskCache(disk_cache_folder()) if disk_cache else None,
                                  counts)
        logger.info("IDFusion: %d reference crop(s) of '%s' encoded at %d px%s", ident.count, label, size,
                    f", counted {list(counts)} times" if counts else "")
        return io.NodeOutput(ReferenceFeatures(reference_net, (ident,), (1.0,)))


class CombineIdentities(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        slots = []
        for i in range(1, 5):
            optional = i > 2
            slots += [
                types.ReferenceFeatures.Input(f"features_{i}", optional=optional,
                                              tooltip=f"Identity {i} (from 'IDFusion Face Features')."
                                                      + (" Optional." if optional else "")),
                io.Float.Input(f"weight_{i}", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip=f"Mixing weight of identity {i} (weights are normalised to sum 1). "
                                       f"With identity masks, identity {i} is mask {i}."),
            ]
        return io.Schema(
            node_id="IDFusionCombineIdentities",
            display_name="IDFusion Combine Identities",
            category="IDFusion/reference",
            description="Several identities in one set: mixed by weight (FlashFace identity mixing), one per batch "
                        "item, or one per region with identity masks. Order = identity index.",
            inputs=slots,
            outputs=[types.ReferenceFeatures.Output(display_name="identities",
                                                    tooltip="The combined identities, in input order.")],
        )

    @classmethod
    def execute(cls, weight_1, weight_2, weight_3, weight_4, features_1, features_2,
                features_3=None, features_4=None) -> io.NodeOutput:
        from ..models.references import ReferenceFeatures

        given = [(f, w) for f, w in ((features_1, weight_1), (features_2, weight_2),
                                      (features_3, weight_3), (features_4, weight_4)) if f is not None]
        refnet = given[0][0].refnet
        identities, weights = [], []
        for index, (feats, weight) in enumerate(given, start=1):
            if feats.refnet is not refnet:
                raise ValueError(f"IDFusionCombineIdentities: features_{index} comes from a different ReferenceNet than "
                                 f"features_1; encode every identity with the same 'IDFusion ReferenceNet Loader'")
            mix = feats.mix()
            identities += feats.identities
            weights += [weight * float(w) for w in mix]
        if sum(weights) <= 0:
            raise ValueError("IDFusionCombineIdentities: all weights are 0; give at least one identity a weight > 0")
        return io.NodeOutput(ReferenceFeatures(refnet, tuple(identities), tuple(weights)))


def build_routing(node: str, features, identity_mode, identity_masks, outside, region=None, dit=False):
    from ..models.engine import MODE_REGION, Routing

    if getattr(getattr(features, "refnet", None), "kind", None) == "dit" and not dit:
        raise ValueError(f"{node}: 'features' come from 'IDFusion DiT Face Features' (for DiTs); for this UNet "
                         f"encode them with 'IDFusion Face Features'")
    if identity_mode == MODE_REGION:
        if identity_masks is None:
            raise ValueError(f"{node}: identity_mode is '{MODE_REGION}' but 'identity_masks' is not connected; "
                             f"connect 'IDFusion Multi-ID Masks'")
        if identity_masks.count != features.count:
            raise ValueError(f"{node}: 'identity_masks' has {identity_masks.count} region(s) but 'features' has "
                             f"{features.count} identit{'y' if features.count == 1 else 'ies'}; give one mask per identity, "
                             f"in the same order")
        return Routing(MODE_REGION, identity_masks.masks, outside, region)
    if identity_masks is not None:
        raise ValueError(f"{node}: 'identity_masks' is connected but identity_mode is '{identity_mode}'; "
                         f"choose '{MODE_REGION}' or disconnect the masks")
    return Routing(identity_mode, None, outside, region)


def check_position_mask(node: str, mask):
    if mask is None:
        return None
    if mask.ndim == 3:
        if mask.shape[0] != 1 and not all(torch.equal(mask[0], m) for m in mask[1:]):
            raise ValueError(f"{node}: 'position_mask' holds {mask.shape[0]} different masks; give one mask for the image")
        mask = mask[0]
    if mask.ndim != 2 or min(mask.shape) < 8:
        raise ValueError(f"{node}: 'position_mask' must be one MASK at the image size, got shape {tuple(mask.shape)}")
    return (mask > 0.5).float().cpu()


class ReferenceAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDFusionReferenceAttention",
            display_name=DISPLAY_NAME,
            category="IDFusion/reference",
            description="Patches a clone of the MODEL so its self-attention also attends over the reference faces "
                        "(FlashFace). FlashFace weights: x += λ·A′(y, [y, refs]) + (1−λ)·A′(y, y) on the middle and "
                        "decoder blocks. Training-free: self-attention becomes (1−λ)·Attn(y, y) + λ·Attn(y, [y, refs]).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to patch (FlashFace: the MODEL from the ReferenceNet loader)."),
                types.ReferenceFeatures.Input("features", tooltip="From 'IDFusion Face Features' or 'IDFusion Combine Identities'."),
                io.Float.Input("strength", default=0.85, min=0.0, max=2.0, step=0.01,
                               tooltip="λ_feat. FlashFace paper: 0.75–1 (default 0.85); official demo up to 1.2. "
                                       "0 = no reference."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the reference starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the reference stops."),
                io.Combo.Input("blocks", options=[AUTO, *SELECTIONS], default=AUTO,
                               tooltip="Which transformer blocks attend to the references. FlashFace weights exist "
                                       "for the decoder (middle + output) only."),
                *routing_inputs(),
                io.Mask.Input("position_mask", optional=True,
                              tooltip="Where the face goes, at the image size. FlashFace weights: the UNet's "
                                      "face-position channel. Training-free: references apply only inside."),
            ],
            outputs=[io.Model.Output(display_name="patched model",
                                     tooltip="The patched clone; the input MODEL is untouched.")],
        )

    @classmethod
    def execute(cls, model, features, strength, start_percent, end_percent, blocks, identity_mode, outside,
                identity_masks=None, position_mask=None) -> io.NodeOutput:
        from ..models.engine import POSITION, Spec
        from ..models.references import FLASHFACE

        node = "IDFusionReferenceAttention"
        check_patch_inputs(node, model, start_percent, end_percent)
        check_features_fit(node, model, features)
        mask = check_position_mask(node, position_mask)
        flashface = features.refnet.kind == FLASHFACE
        routing = build_routing(node, features, identity_mode, identity_masks, outside, None if flashface else mask)
        m = model.clone()
        table = block_table(m)
        if flashface:
            patch = find_flashface_patch(m)
            if blocks not in (AUTO, DECODER):
                raise ValueError(f"{node}: FlashFace's extra attention exists on the decoder only; set blocks to "
                                 f"'{AUTO}' or '{DECODER}'")
            spec = Spec("reference", features, tuple(sorted(patch.blocks, key=table.index)), "attn1", strength,
                        start_percent, end_percent, routing, DISPLAY_NAME)
            replace_flashface_patch(m, patch, patch.with_spec(spec))
            if mask is not None:
                set_option(m, POSITION, mask)
        else:
            selected = select_blocks(table, DECODER if blocks == AUTO else blocks)
            spec = Spec("reference", features, selected, "attn1", strength, start_percent, end_percent, routing,
                        DISPLAY_NAME)
            patch_training_free(m, spec)
        add_to_plan(m, spec)
        return io.NodeOutput(m)


def model_family(model_patcher) -> str:
    """The family of a MODEL as users know it ("SD1.5", "SDXL", ...): the nearest model config
    class in the host's hierarchy that has a name here (Segmind Vega is an SDXL), else its own."""
    config = type(model_patcher.model.model_config)
    return next((FAMILY_NAMES[c.__name__] for c in config.__mro__ if c.__name__ in FAMILY_NAMES), config.__name__)


def is_flashface_model(model_patcher) -> bool:
    """FlashFace's MODEL: its UNet takes one input channel more than the latent (the face position)."""
    base = model_patcher.model
    return base.diffusion_model.in_channels == base.latent_format.latent_channels + 1


def check_features_fit(node: str, model, features) -> None:
    """FEATURES made for another model family, or for FlashFace's MODEL where a plain one is patched
    (and the reverse), would fail deep inside sampling: refuse them here, naming both nodes."""
    from ..models.references import FLASHFACE

    if features.refnet.kind == "dit":
        return  # DiT features: build_routing names the DiT node to use
    if features.refnet.kind == FLASHFACE:
        patch = find_flashface_patch(model)
        if patch is None or patch.modules is not features.refnet.modules:
            raise ValueError(f"{node}: 'features' were encoded with the FlashFace weights of 'IDFusion ReferenceNet "
                             f"Loader' ({features.refnet.label}), but 'model' is not the FlashFace MODEL that loader "
                             f"returned; connect that loader's MODEL output to 'model' (LoRAs may sit in between)")
        return
    if is_flashface_model(model):
        raise ValueError(f"{node}: 'features' were encoded by a plain UNet ('IDFusion ReferenceNet Loader' set to "
                         f"training-free), but 'model' is FlashFace's MODEL (5 input channels); encode the features "
                         f"with the REFERENCE_NET of the loader that loaded FlashFace ('IDFusion Face Features' → "
                         f"reference_net), or connect a plain checkpoint's MODEL")
    made_for, given = model_family(features.refnet.model_patcher), model_family(model)
    ident = features.identities[0]
    width = next(iter(transformer_blocks(model.model.diffusion_model).values())).attn2.to_k.weight.shape[1]
    adm = model.model.diffusion_model.num_classes is not None
    if made_for != given or ident.context.shape[-1] != width or (ident.y is not None) != adm:
        raise ValueError(f"{node}: 'features' were encoded for an {made_for} model (the MODEL given to 'IDFusion "
                         f"ReferenceNet Loader'), but 'model' is an {given} model; connect this {given} MODEL to "
                         f"'IDFusion ReferenceNet Loader' and encode the faces again with 'IDFusion Face Features' "
                         f"(with the same checkpoint's CLIP and VAE)")


def check_patch_inputs(node: str, model, start_percent: float, end_percent: float) -> None:
    require_unet(model, node)
    if start_percent > end_percent:
        raise ValueError(f"{node}: start_percent ({start_percent}) is after end_percent ({end_percent}); "
                         f"make start_percent the smaller")


def add_to_plan(m, spec) -> None:
    """Add a patch node's spec to the MODEL clone's plan and install the (single) wrapper that
    runs the reference passes for every spec."""
    from ..models.engine import PLAN, Plan, apply_model_wrapper
    set_option(m, PLAN, (get_option(m, PLAN) or Plan()).with_spec(spec))
    set_apply_model_wrapper(m, apply_model_wrapper)


def patch_training_free(m, spec) -> None:
    from ..models.patches import TrainingFreeReference

    for key in spec.blocks:
        existing = attn1_replace(m, key)
        if isinstance(existing, TrainingFreeReference):
            patch = existing.with_spec(spec)
        else:
            if existing is not None:
                logger.warning("IDFusion: replacing another node's self-attention patch on block %s", key)
            patch = TrainingFreeReference(key, (spec,))
        set_attn1_replace(m, patch, key)


def find_flashface_patch(m):
    from ..models.patches import FlashFaceAttention
    patches = m.model_options.get("transformer_options", {}).get("patches", {})
    return next((p for p in patches.get("attn1_output_patch", []) if isinstance(p, FlashFaceAttention)), None)


def replace_flashface_patch(m, old, new) -> None:
    """Swap FlashFace's patch pair (capture, output) on a clone for one with another spec."""
    patches = m.model_options["transformer_options"]["patches"]
    patches["attn1_output_patch"] = [new if p is old else p for p in patches["attn1_output_patch"]]
    patches["attn1_patch"] = [new.capture if getattr(p, "__self__", None) is old else p for p in patches["attn1_patch"]]


NODES = [FaceFeatures, CombineIdentities, ReferenceAttention]
