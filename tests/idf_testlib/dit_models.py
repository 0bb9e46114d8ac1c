"""Tiny random-weight DiTs built in process from the host's own classes (Flux.1 / Kontext, Flux.2,
Chroma, Qwen-Image), and their inputs: conditioning, reference latents, sampling.

Widths are tiny (64, 4 heads of 16) but every block type, the rotary positions, the
reference-latent handling and the model call are the host's. The sizes below are shared
with the file fixtures (``dit_fixtures``), which must keep Flux's head width of 128.
"""
import torch

from .host import boot
from .models import init_weights

#: The first ComfyUI with the DiT hooks (see models/dit/host.py), written out: no pack code needed.
DIT_MIN_VERSION = (0, 17, 0)
CONTEXT = 32            # text width of the tiny in-process models
POOLED = 32             # pooled text width (Flux.1's vector_in)

FLUX_TINY = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=POOLED, context_in_dim=CONTEXT,
                 hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
FLUX2_TINY = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=CONTEXT,
                  hidden_size=64, mlp_ratio=3.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 4, 4, 4],
                  theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False, txt_ids_dims=[3],
                  global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                  ref_index_scale=10.0)
CHROMA_TINY = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=CONTEXT, hidden_size=64,
                   mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000,
                   patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=64, n_layers=2, txt_ids_dims=[],
                   vec_in_dim=None)
QWEN_TINY = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=3,
                 attention_head_dim=16, num_attention_heads=4, joint_attention_dim=CONTEXT, axes_dims_rope=(4, 6, 6))

CONFIGS = {"flux": FLUX_TINY, "flux2": FLUX2_TINY, "chroma": CHROMA_TINY, "qwen_image": QWEN_TINY}


def _model_config(name: str, overrides: dict):
    import comfy.supported_models as sm
    cls = {"flux": sm.Flux, "flux2": sm.Flux2, "chroma": sm.Chroma, "qwen_image": sm.QwenImage}[name]
    config = cls({**CONFIGS[name], **overrides})
    config.set_inference_dtype(torch.float32, None)
    return config


def tiny_dit(name: str, seed: int = 0, **overrides):
    """A ModelPatcher around a tiny random DiT of family ``name`` (see ``CONFIGS``)."""
    boot()
    import comfy.model_management as mm
    import comfy.model_patcher
    model = _model_config(name, overrides).get_model({})
    init_weights(model.diffusion_model, seed)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latent_shape(model, h: int, w: int, batch: int = 1) -> tuple:
    """Shape of a latent of ``h × w`` latent pixels for the model (Qwen-Image's are 5-D)."""
    channels = model.model.latent_format.latent_channels
    return (batch, channels, 1, h, w) if model.model.latent_format.latent_dimensions == 3 else (batch, channels, h, w)


def latent(model, h: int, w: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(latent_shape(model, h, w, batch), generator=gen(seed))


def conditioning(seed: int, tokens: int = 6, pooled: bool = True, **extra):
    """A CONDITIONING as a text encoder makes it: [[context [1, T, CONTEXT], {pooled_output, ...}]]."""
    values = {"pooled_output": torch.randn(1, POOLED, generator=gen(seed + 1))} if pooled else {}
    return [[torch.randn(1, tokens, CONTEXT, generator=gen(seed)), {**values, **extra}]]


def with_references(cond, refs: list[torch.Tensor]):
    """``cond`` with reference latents appended, as ReferenceLatent nodes chained in order do."""
    import node_helpers
    return node_helpers.conditioning_set_values(cond, {"reference_latents": list(refs)}, append=True)


def sample(model, positive, negative=None, h: int = 8, w: int = 8, steps: int = 2, cfg: float = 1.0, seed: int = 0,
           sampler: str = "euler"):
    """KSampler-equivalent sampling (comfy.sample.sample) of a fresh latent."""
    import comfy.sample
    empty = torch.zeros(latent_shape(model, h, w))
    noise = torch.randn(empty.shape, generator=gen(seed))
    negative = negative if negative is not None else positive
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", positive, negative, empty,
                               disable_pbar=True, seed=seed)


def apply(model, x: torch.Tensor, cond, sigma: float = 0.6, guidance: float = 3.5, transformer_options=None):
    """One model call the way the sampler makes it: ``BaseModel.apply_model`` with the conditioning's
    model inputs (references included) built by the host's ``extra_conds``."""
    import comfy.patcher_extension
    base = model.model
    extra = {"cross_attn": cond[0][0], "noise": x, "device": x.device, "guidance": guidance}
    extra.update({k: v for k, v in cond[0][1].items() if k in ("pooled_output", "reference_latents",
                                                             "reference_latents_method")})
    built = base.extra_conds(**extra)
    kwargs = {k: c.process_cond(batch_size=x.shape[0], area=None, device=x.device).cond for k, c in built.items()}
    options = dict(model.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(model.wrappers)   # as the sampler adds them
    options.update(transformer_options or {})
    c_crossattn = kwargs.pop("c_crossattn")
    return base.apply_model(x, torch.full((x.shape[0],), sigma), c_crossattn=c_crossattn, transformer_options=options,
                            **kwargs)


class BlockInputs:
    """An attn1_patch to register after IDFusion's: keeps every block's q, k, v, positions and the
    call layout IDFusion recorded (for measuring isolation block by block)."""

    def __init__(self):
        self.blocks = []

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        from IDFusion.models.dit.engine import CALL
        call = extra_options[CALL]
        self.blocks.append((q, k, v, pe, call, call.pending))
        return {}
