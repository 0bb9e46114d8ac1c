"""DiT nodes (Flux.1 / Kontext, Flux.2, Chroma, Qwen-Image): several people as native
references with per-person strengths and region routing, and training-free reference
attention with its features. They work through the host's DiT attention hooks (ComfyUI
0.17.0 or newer) and refuse on older hosts."""
from __future__ import annotations

import functools
import logging

import comfy.patcher_extension
import torch
from .api import io

from . import types
from .reference import OUTSIDE_CHOICES, build_routing, disk_cache_folder, routing_inputs
from .unet_blocks import get_option, set_option, set_outer_sample_wrapper

logger = logging.getLogger("IDFusion")

BLOCKS_ALL = "all (double + single)"
BLOCKS_DOUBLE = "double (joint) blocks"
BLOCKS_SINGLE = "single blocks"
BLOCK_CHOICES = (BLOCKS_ALL, BLOCKS_DOUBLE, BLOCKS_SINGLE)
TIMESTEP_CURRENT = "current (FlashFace)"
TIMESTEP_ZERO = "zero (once per run)"
WRAPPER_KEY = "idfusion_dit"
PEOPLE = 4

FEATURES_NODE = "IDFusionDiTFaceFeatures"
REFERENCE_NODE = "IDFusionDiTReferenceAttention"
PEOPLE_NODE = "IDFusionDiTIdentityReferences"


def require_dit(node: str, model):
    """The host has the DiT hooks and ``model`` is a DiT family the nodes patch; its family."""
    from ..models.dit.families import require_family
    from ..models.dit.host import require_dit_hooks
    require_dit_hooks(node)
    return require_family(model, node)


DIT_KIND = "dit"


@functools.cache
def dit_reference_net():
    """The one REFERENCE_NET of DiT features: the sampled DiT encodes its own references (its
    weights are read at call time), so features of several people combine."""
    from ..models.references import ReferenceNet
    return ReferenceNet(DIT_KIND, "the sampled DiT (training-free)")


def encode_crops(node: str, model, vae, crops: torch.Tensor, size: int) -> torch.Tensor:
    """Face crops [N, H, W, C] → padded to ``size`` squares → the VAE's latents [N, C, (T,) h, w]
    (as VAE Encode gives them), checked against the model's latent channels."""
    from ..models.faces.analysis import pad_to_square

    latents = vae.encode(pad_to_square(crops, size))
    channels = model.model.latent_format.latent_channels
    if latents.shape[1] != channels:
        raise ValueError(f"{node}: 'vae' makes {latents.shape[1]}-channel latents but the model uses {channels}; "
                         f"connect the VAE of the same model family")
    return latents.float().cpu()


def install(m, plan) -> None:
    """Put the plan on the clone ``m`` with the layout hook and the two wrappers (each once)."""
    from ..models.dit.engine import PLAN, LayoutRecorder, apply_model_wrapper, run_scope_wrapper

    set_option(m, PLAN, plan)
    patches = m.model_options.get("transformer_options", {}).get("patches", {})
    if not any(isinstance(p, LayoutRecorder) for p in patches.get("attn1_patch", [])):
        m.set_model_attn1_patch(LayoutRecorder())
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    set_outer_sample_wrapper(m, WRAPPER_KEY, run_scope_wrapper)


def current_plan(m):
    from ..models.dit.engine import PLAN, DitPlan
    return get_option(m, PLAN) or DitPlan()


def select_dit_blocks(m, family, selection: str) -> frozenset:
    from ..models.dit.families import dit_blocks
    table = dit_blocks(m.model.diffusion_model, family)
    if selection == BLOCKS_DOUBLE:
        table = tuple(b for b in table if b[0] == "double")
    elif selection == BLOCKS_SINGLE:
        table = tuple(b for b in table if b[0] == "single")
    if not table:
        raise ValueError(f"{REFERENCE_NODE}: this {family.label} model has no {selection}; choose '{BLOCKS_ALL}'")
    return frozenset(table)


class DiTFaceFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=FEATURES_NODE,
            display_name="IDFusion DiT Face Features",
            category="IDFusion/dit",
            description="Encodes one person's reference faces for 'IDFusion DiT Reference Attention' (Flux.1, Flux.2, "
                        "Chroma, Qwen-Image). During sampling the DiT runs a reference pass over them and keeps every "
                        "block's reference keys/values, cached by content. Needs ComfyUI 0.17.0 or newer.",
            inputs=[
                io.Model.Input("model", tooltip="The DiT you sample with (its latent format and weights encode the "
                                                "references)."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the reference crops to clean latents."),
                io.Conditioning.Input("empty_prompt",
                                      tooltip="The empty prompt through the model's text encoder (CLIP Text "
                                              "Encode with no text): the context the reference pass runs with, "
                                              "as in FlashFace."),
                io.Image.Input("images", optional=True, tooltip="Face crops of ONE person (1–N). Or use 'identity'."),
                types.Identity.Input("identity", optional=True,
                                     tooltip="An identity from 'IDFusion Identity' (instead of 'images')."),
                io.Int.Input("size", default=512, min=64, max=2048, step=16,
                             tooltip="Reference crop size in pixels (square, padded black). 512 gives 1024 tokens "
                                     "per reference on Flux; keys/values grow with it (see docs/dit.md)."),
                io.Boolean.Input("disk_cache", default=False,
                                 tooltip="Also keep the reference keys/values on disk (ComfyUI user folder). They are "
                                         "large: hundreds of MB per reference and step at Flux width."),
            ],
            outputs=[types.ReferenceFeatures.Output(display_name="features",
                                                    tooltip="Feed to 'IDFusion DiT Reference Attention' (or combine "
                                                            "several with 'IDFusion Combine Identities').")],
        )

    @classmethod
    def execute(cls, model, vae, empty_prompt, size, disk_cache, images=None, identity=None) -> io.NodeOutput:
        from ..models.feature_cache import DiskCache
        from ..models.references import ReferenceFeatures, ReferenceIdentity

        require_dit(FEATURES_NODE, model)
        crops, label = _crops(images, identity)
        latents = model.model.process_latent_in(encode_crops(FEATURES_NODE, model, vae, crops, size))
        context, pooled = _empty_prompt(empty_prompt)
        disk = DiskCache(disk_cache_folder()) if disk_cache else None
        ident = ReferenceIdentity(label, latents.cpu(), context, pooled, disk)
        logger.info("IDFusion: %d DiT reference crop(s) of '%s' encoded at %d px", ident.count, label, size)
        return io.NodeOutput(ReferenceFeatures(dit_reference_net(), (ident,), (1.0,)))


def _crops(images, identity) -> tuple[torch.Tensor, str]:
    if (images is None) == (identity is None):
        raise ValueError(f"{FEATURES_NODE}: connect exactly one of 'images' (an IMAGE batch of face crops) or "
                         f"'identity' (from 'IDFusion Identity')")
    if identity is not None:
        return identity.crops, identity.label
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{FEATURES_NODE}: 'images' must be an IMAGE batch [N, H, W, C] of 1 or more face crops, "
                         f"got shape {tuple(images.shape)}")
    return images, "identity"


def _empty_prompt(conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not conditioning or not torch.is_tensor(conditioning[0][0]) or conditioning[0][0].ndim != 3:
        raise ValueError(f"{FEATURES_NODE}: 'empty_prompt' is not a text conditioning; connect CLIP Text Encode "
                         f"with an empty text")
    context, extra = conditioning[0][0], conditioning[0][1]
    pooled = extra.get("pooled_output")
    return context[:1].float().cpu(), None if pooled is None else pooled[:1].float().cpu()


class DiTReferenceAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=REFERENCE_NODE,
            display_name="IDFusion DiT Reference Attention",
            category="IDFusion/dit",
            description="Training-free reference attention for DiTs without native references (Flux.1-dev, Chroma; "
                        "works on Flux.2 and Qwen-Image too): every chosen block's joint attention becomes "
                        "(1−λ)·Attn(y, self) + λ·Attn(y, [self, reference keys/values]) for the image tokens, the "
                        "references' keys/values from a reference pass of their clean latents. Needs ComfyUI 0.17.0+.",
            inputs=[
                io.Model.Input("model", tooltip="The DiT to patch (a clone is returned)."),
                types.ReferenceFeatures.Input("features", tooltip="From 'IDFusion DiT Face Features' or 'IDFusion "
                                                                  "Combine Identities'."),
                io.Float.Input("strength", default=0.85, min=0.0, max=2.0, step=0.01,
                               tooltip="λ: how much of the attention blends in the references (FlashFace: "
                                       "0.75–1). 0 = off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the references start."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the references stop."),
                io.Combo.Input("blocks", options=list(BLOCK_CHOICES), default=BLOCKS_ALL,
                               tooltip="Which blocks attend to the references (Qwen-Image has double blocks only)."),
                io.Combo.Input("reference_timestep", options=[TIMESTEP_CURRENT, TIMESTEP_ZERO], default=TIMESTEP_ZERO,
                               tooltip="Run the reference pass at the current timestep every step (FlashFace), or "
                                       "once at timestep zero and reuse it for the whole run (faster, less memory)."),
                *routing_inputs(where="image tokens"),
            ],
            outputs=[io.Model.Output(display_name="patched model",
                                     tooltip="The patched clone; the input MODEL is untouched.")],
        )

    @classmethod
    def execute(cls, model, features, strength, start_percent, end_percent, blocks, reference_timestep, identity_mode,
                outside, identity_masks=None) -> io.NodeOutput:
        from ..models.dit.engine import ReferenceSpec

        family = require_dit(REFERENCE_NODE, model)
        if getattr(features.refnet, "kind", None) != DIT_KIND:
            raise ValueError(f"{REFERENCE_NODE}: 'features' were encoded for a UNet ('IDFusion Face Features'); "
                             f"encode them with 'IDFusion DiT Face Features'")
        if start_percent > end_percent:
            raise ValueError(f"{REFERENCE_NODE}: start_percent ({start_percent}) is after end_percent ({end_percent}); "
                             f"make start_percent the smaller")
        routing = build_routing(REFERENCE_NODE, features, identity_mode, identity_masks, outside, dit=True)
        m = model.clone()
        spec = ReferenceSpec(features, select_dit_blocks(m, family, blocks), strength, start_percent, end_percent,
                             routing, reference_timestep == TIMESTEP_ZERO)
        install(m, current_plan(m).with_reference(spec))
        return io.NodeOutput(m)


class DiTIdentityReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        people = []
        for i in range(1, PEOPLE + 1):
            optional = i > 1
            people += [
                types.Identity.Input(f"identity_{i}", optional=optional,
                                     tooltip=f"Person {i} (from 'IDFusion Identity'): each of its crops becomes one "
                                             f"reference image." + (" Optional." if optional else "")),
                io.Float.Input(f"strength_{i}", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip=f"How strongly person {i}'s references act: a log-bias log(strength) on their "
                                       f"keys. 1 = as the model does natively, 0 = not at all."),
            ]
        return io.Schema(
            node_id=PEOPLE_NODE,
            display_name="IDFusion DiT Identity References",
            category="IDFusion/dit",
            description="Several people as native reference images of an edit DiT (Flux Kontext, Flux.2, Qwen-Image-"
                        "Edit), each with its own strength; with identity masks, image tokens in person j's region "
                        "attend only to person j's references (and the text). Adds the references to the conditioning "
                        "and patches the MODEL. Needs ComfyUI 0.17.0+.",
            inputs=[
                io.Model.Input("model", tooltip="An edit DiT that takes reference latents (a clone is returned)."),
                io.Conditioning.Input("positive", tooltip="The prompt; the people's references are appended to it."),
                io.Conditioning.Input("negative", tooltip="The negative prompt; it gets the same references."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the face crops to reference latents."),
                *people,
                io.Int.Input("size", default=512, min=64, max=2048, step=16,
                             tooltip="Reference image size in pixels (each crop padded to a black square)."),
                io.Combo.Input("outside", options=list(OUTSIDE_CHOICES), default="all",
                               tooltip="With masks: image tokens outside every region see every person's "
                                       "references, or none."),
                types.IdentityMasks.Input("identity_masks", optional=True,
                                          tooltip="One region per person, in person order, from 'IDFusion Multi-ID "
                                                  "Masks'. Without masks every token sees every person."),
            ],
            outputs=[io.Model.Output(display_name="patched model",
                                     tooltip="The patched clone; the input MODEL is untouched."),
                     io.Conditioning.Output("positive_out", display_name="positive",
                                            tooltip="The prompt with the people's reference latents."),
                     io.Conditioning.Output("negative_out", display_name="negative",
                                            tooltip="The negative prompt with the same references.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, identity_1, strength_1, strength_2, strength_3, strength_4, size,
                outside, identity_2=None, identity_3=None, identity_4=None, identity_masks=None) -> io.NodeOutput:
        import node_helpers

        from ..models.dit.engine import PeopleSpec
        from ..models.dit.families import dit_blocks

        family = require_dit(PEOPLE_NODE, model)
        if not family.native_references:
            raise ValueError(f"{PEOPLE_NODE}: {family.label} takes no reference latents; use 'IDFusion DiT Reference "
                             f"Attention' (training-free) instead")
        given = [(ident, s) for ident, s in ((identity_1, strength_1), (identity_2, strength_2),
                                             (identity_3, strength_3), (identity_4, strength_4)) if ident is not None]
        shared = _reference_count(positive, "positive")
        if _reference_count(negative, "negative") != shared:
            raise ValueError(f"{PEOPLE_NODE}: 'positive' and 'negative' carry different numbers of reference latents; "
                             f"give both the same ReferenceLatent nodes before this one")
        latents = [encode_crops(PEOPLE_NODE, model, vae, ident.crops, size) for ident, _ in given]
        refs = [lat[i:i + 1] for lat in latents for i in range(lat.shape[0])]
        routing = _people_routing(identity_masks, len(given), outside)
        m = model.clone()
        if current_plan(m).people is not None:
            raise ValueError(f"{PEOPLE_NODE}: 'model' already went through this node; use one node for all people")
        blocks = frozenset(dit_blocks(m.model.diffusion_model, family))
        spec = PeopleSpec(PEOPLE_NODE, shared, tuple(int(lat.shape[0]) for lat in latents),
                          tuple(float(s) for _, s in given), routing, blocks)
        install(m, current_plan(m).with_people(spec))
        add = {"reference_latents": refs}
        return io.NodeOutput(m, node_helpers.conditioning_set_values(positive, add, append=True),
                             node_helpers.conditioning_set_values(negative, add, append=True))


def _reference_count(conditioning, name: str) -> int:
    counts = {len(c[1].get("reference_latents") or []) for c in conditioning}
    if len(counts) > 1:
        raise ValueError(f"{PEOPLE_NODE}: the entries of '{name}' carry different numbers of reference latents; "
                         f"combine conditionings after this node")
    return counts.pop() if counts else 0


def _people_routing(identity_masks, count: int, outside: str):
    from ..models.engine import MODE_MIX, MODE_REGION, Routing
    if identity_masks is None:
        return Routing(MODE_MIX)
    if identity_masks.count != count:
        raise ValueError(f"{PEOPLE_NODE}: 'identity_masks' has {identity_masks.count} region(s) but {count} person(s) "
                         f"are connected; give one mask per person, in the same order")
    return Routing(MODE_REGION, identity_masks.masks, outside)


NODES = [DiTFaceFeatures, DiTReferenceAttention, DiTIdentityReferences]
