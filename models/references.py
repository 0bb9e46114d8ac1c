"""Reference networks and encoded references: the values behind the REFERENCE_NET and
REFERENCE_FEATURES sockets.

All of these are immutable once built and return themselves from ``__deepcopy__``: ComfyUI
deep-copies ``model_options`` on every ``ModelPatcher.clone()``, and these objects hold
tensors and weights that must be shared, never copied.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .feature_cache import DiskCache, tensor_digest

TRAINING_FREE = "training-free"
FLASHFACE = "flashface"
#: FlashFace's official code always attends over this many references (``cfg.num_pairs``).
FLASHFACE_REFERENCE_COUNT = 4


def cyclic_counts(n: int, total: int) -> tuple[int, ...] | None:
    """How often each of n references appears when they are repeated in turn up to ``total``
    (r1, r2, r3, r1, …): ``(2, 1, 1)`` for 3 of 4. None when there is nothing to repeat."""
    if total <= n:
        return None
    return tuple(total // n + (1 if i < total % n else 0) for i in range(n))


class Shared:
    """Mixin: shared by reference across model clones."""

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self


@dataclass(frozen=True, eq=False)
class FlashFaceModules(Shared):
    """FlashFace's trained parts that ComfyUI's UNet lacks.

    patcher: a ComfyUI ModelPatcher around an ``nn.Module`` with ``input_blocks`` and
    ``output_blocks`` (the ReferenceNet's encoder and decoder, ComfyUI layout) and
    ``extra_attention`` (ModuleDict ``"<block>_<number>_<index>"`` → A′, an attention with
    to_q/to_k/to_v/to_out). ComfyUI loads and offloads it with the model (``models()``).
    """

    patcher: object
    source: str

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model

    def extra_attention(self, key) -> torch.nn.Module:
        return self.module.extra_attention[f"{key[0]}_{key[1]}_{key[2]}"]

    def has_extra_attention(self, key) -> bool:
        return f"{key[0]}_{key[1]}_{key[2]}" in self.module.extra_attention


@dataclass(frozen=True, eq=False)
class ReferenceNet(Shared):
    """Which network encodes references.

    kind: ``training-free`` (the sampled UNet encodes its own references, shared weights) or
    ``flashface`` (FlashFace's ReferenceNet encoder/decoder; time embedding, middle block and
    head shared with the sampled FlashFace UNet). ``model_patcher`` is the MODEL the loader
    returned (its latent format and ADM encoder are used to encode references); ``modules``
    is set for ``flashface``.
    """

    kind: str
    label: str
    model_patcher: object = None
    modules: FlashFaceModules | None = None


@dataclass(frozen=True, eq=False)
class ReferenceIdentity(Shared):
    """One identity's references, encoded and ready for reference passes.

    latents: [N, C, h, w] clean latents in the model's space (VAE mean × latent scale), CPU.
    context: [1, T, D] the text context the reference pass runs with (FlashFace: the encoded
    negative prompt; or the empty prompt), CPU.
    y: [1, A] the ADM vector for SDXL-style models (None for SD1.5).
    counts: how many times each reference counts in attention (FlashFace pads to four by
    repetition); None = once each. The reference pass runs on the N distinct latents only.
    """

    label: str
    latents: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor | None = None
    disk_cache: DiskCache | None = None
    counts: tuple[int, ...] | None = None
    _digests: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.counts is not None and (len(self.counts) != self.count or min(self.counts) < 1):
            raise ValueError(f"counts {self.counts} do not fit {self.count} references (one count >= 1 each)")

    @property
    def count(self) -> int:
        return int(self.latents.shape[0])

    @property
    def runs(self) -> tuple[tuple[int, int], ...] | None:
        """Consecutive references with the same count: ``((references, count), …)``; None when
        each counts once."""
        if self.counts is None or all(c == 1 for c in self.counts):
            return None
        runs: list[list[int]] = []
        for c in self.counts:
            if runs and runs[-1][1] == c:
                runs[-1][0] += 1
            else:
                runs.append([1, c])
        return tuple((n, c) for n, c in runs)

    @property
    def digest(self) -> str:
        if "latents" not in self._digests:
            self._digests["latents"] = tensor_digest(self.latents)
        return self._digests["latents"]

    @property
    def context_digest(self) -> str:
        if "context" not in self._digests:
            parts = [tensor_digest(self.context)] + ([tensor_digest(self.y)] if self.y is not None else [])
            self._digests["context"] = hashlib.sha256("|".join(parts).encode()).hexdigest()
        return self._digests["context"]


@dataclass(frozen=True, eq=False)
class ReferenceFeatures(Shared):
    """One or more identities on one reference network, with mixing weights (one per identity)."""

    refnet: ReferenceNet
    identities: tuple[ReferenceIdentity, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if not self.identities:
            raise ValueError("reference features need at least one identity")
        if len(self.weights) != len(self.identities):
            raise ValueError(f"{len(self.identities)} identities but {len(self.weights)} weights")

    @property
    def count(self) -> int:
        return len(self.identities)

    def mix(self) -> torch.Tensor:
        """Mixing weights normalised to sum 1 (FlashFace supplement eq. 1); [M]."""
        w = torch.tensor(self.weights, dtype=torch.float32)
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"identity weights must be >= 0 and not all 0, got {list(self.weights)}")
        return w / w.sum()
