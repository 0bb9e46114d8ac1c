"""ConsistentID's ID tokens in cross-attention: an attn2 replace patch per block.

The official processor computes ``SDPA(q, K_text, V_text) + scale·SDPA(q, to_k_ip(id), to_v_ip(id))``
before ``to_out`` (q and the text keys/values carry the LoRA, which the host merges into the
weights). ``IDTokenAttention`` adds the second term to whatever the block computes without it:
the host's plain attention, or an inner attn2 replace patch it wraps (fused keys/values, another
node's patch), so both compose on one block.

Rows follow ``cond_or_uncond``: index 1 (the negative) gets the unconditional ID tokens, every
other row the person's. Several people: all identities' tokens form one key sequence with a
log-weight bias ``log α_i(q)``; by region a query in region j has −inf on every other identity's
keys (exactly zero attention), outside all regions it mixes them by weight (``outside="all"``) or
gets no ID tokens at all (``"none"``, conditional and unconditional rows alike); per batch item
each row sees one identity.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...attention.fused_kv import identity_bias
from ...attention.routing import fit_to_latent, query_weights
from ..engine import MODE_PER_ITEM, MODE_REGION, row_conds, row_items
from ..patches import host_attention
from ..references import Shared


@dataclass(frozen=True, eq=False)
class IDTokens(Shared):
    """One Apply node's ID tokens.

    adapter: ModelPatcher of ``weights.AdapterLayers``; layers: block key → processor index (str);
    cond_tokens [M, T, C] (one set per identity; a mix is one set); uncond_tokens [T, C];
    masks [M, H, W] at image size for ``MODE_REGION``; mix [M] normalised weights.
    """

    adapter: object
    layers: dict
    cond_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    strength: float
    mode: str
    mix: torch.Tensor
    masks: torch.Tensor | None = None
    outside: str = "all"
    _alpha: dict = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return int(self.cond_tokens.shape[0])

    def alpha(self, seq_len: int, latent_hw: tuple[int, int], cond_or_uncond: list, rows: int) -> torch.Tensor | None:
        """Per-query identity weights [B|1, L|1, M], or None for one identity everywhere."""
        if self.mode == MODE_REGION:
            key = (seq_len, latent_hw)
            if key not in self._alpha:
                masks = fit_to_latent(self.masks, *latent_hw, what="identity masks")
                self._alpha[key] = query_weights(masks, seq_len, latent_hw, self.mix, self.outside)
            return self._alpha[key]
        if self.mode == MODE_PER_ITEM and self.count > 1:
            items = row_items(cond_or_uncond, rows) % self.count
            return F.one_hot(items, self.count).float().unsqueeze(1)
        return None


def id_token_attention(spec: IDTokens, index: str, q: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """``Attn(q, to_k_ip(tokens), to_v_ip(tokens))`` of one block, rows and regions routed: [B, L, inner]."""
    layer = spec.adapter.model.layers[index]
    rows = q.shape[0]
    cond_or_uncond = extra_options.get("cond_or_uncond") or [0]
    uncond = (row_conds(cond_or_uncond, rows) == 1).to(q.device).view(-1, 1, 1)
    m, t, width = spec.cond_tokens.shape
    cond = spec.cond_tokens.reshape(m * t, width).to(q)
    null = spec.uncond_tokens.to(q).repeat(m, 1)                    # M copies: same softmax as one copy
    w_k, w_v = layer.to_k_ip.weight.to(q), layer.to_v_ip.weight.to(q)
    keys = torch.where(uncond, F.linear(null, w_k), F.linear(cond, w_k))
    values = torch.where(uncond, F.linear(null, w_v), F.linear(cond, w_v))
    attend = host_attention(extra_options)
    heads = extra_options["n_heads"]
    latent_hw = tuple(extra_options.get("original_shape", [0, 0, 0, 0])[-2:])
    alpha = spec.alpha(q.shape[1], latent_hw, cond_or_uncond, rows)              # on the host
    if alpha is None or bool((alpha == 1).all()):
        return attend(q, keys, values, heads)
    alpha = alpha.to(q.device, non_blocking=True).expand(rows, -1, -1)
    covered = alpha.sum(-1, keepdim=True) > 0                        # [B, L|1, 1]
    bias = identity_bias(alpha, 0, [t] * m, 1.0, q.dtype)
    bias = torch.where(covered, bias, torch.zeros_like(bias)).expand(-1, q.shape[1], -1)
    return attend(q, keys, values, heads, mask=bias) * covered.to(q.dtype)


class IDTokenAttention(Shared):
    """attn2 replace for one block: ``inner(q, k, v) + Σ strength·Attn(q, K_id, V_id)``.

    ``inner``: the block's attn2 replace patch this one wraps (None: the host's attention).
    Owns no host modules; the adapters' ModelPatchers (and the inner patch's) are in ``models()``.
    """

    wraps_attn2 = True

    def __init__(self, key, specs: tuple, inner=None):
        self.key, self.specs, self.inner = key, specs, inner

    def with_spec(self, spec: IDTokens) -> "IDTokenAttention":
        return IDTokenAttention(self.key, self.specs + (spec,), self.inner)

    def with_inner(self, inner) -> "IDTokenAttention":
        return IDTokenAttention(self.key, self.specs, inner)

    def __call__(self, q, k, v, extra_options):
        if self.inner is not None:
            out = self.inner(q, k, v, extra_options)
        else:
            out = host_attention(extra_options)(q, k, v, extra_options["n_heads"])
        for spec in self.specs:
            if spec.strength != 0:
                out = out + spec.strength * id_token_attention(spec, spec.layers[self.key], q, extra_options)
        return out

    def models(self):
        found = []
        for spec in self.specs:
            if spec.adapter not in found:
                found.append(spec.adapter)
        return found + list(self.inner.models() if hasattr(self.inner, "models") else [])

    def to(self, device_or_dtype):
        return self

    def cleanup(self):
        """After sampling (called by the host): drop the per-layer identity weights, and the inner patch's state."""
        for spec in self.specs:
            spec._alpha.clear()
        if hasattr(self.inner, "cleanup"):
            self.inner.cleanup()
