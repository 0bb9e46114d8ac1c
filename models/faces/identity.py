"""An identity: the reference face crops (and, when known, embeddings) of one person."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Identity:
    """Reference faces of one person.

    crops:      [N, H, W, 3] float in [0, 1]; FlashFace-style face crops (square after
                ``pad_to_square``), one per reference photo.
    embeddings: [N, 512] L2-normalised ArcFace embeddings, or None when no face model ran.
    aligned:    [N, 112, 112, 3] ArcFace-aligned crops, or None.
    label:      a name shown in logs and previews.
    """

    crops: torch.Tensor
    label: str = "identity"
    embeddings: torch.Tensor | None = None
    aligned: torch.Tensor | None = None

    def __post_init__(self):
        if self.crops.ndim != 4 or self.crops.shape[-1] != 3 or self.crops.shape[0] < 1:
            raise ValueError(f"identity '{self.label}': crops must be an IMAGE batch [N, H, W, 3] with N >= 1, "
                             f"got shape {tuple(self.crops.shape)}")
        if self.embeddings is not None and self.embeddings.shape[0] != self.crops.shape[0]:
            raise ValueError(f"identity '{self.label}': {self.embeddings.shape[0]} embeddings for "
                             f"{self.crops.shape[0]} crops; give one embedding per crop")

    @property
    def count(self) -> int:
        return int(self.crops.shape[0])

    def mean_embedding(self) -> torch.Tensor | None:
        """The identity's embedding: the normalised mean of its photos' embeddings."""
        if self.embeddings is None:
            return None
        mean = self.embeddings.float().mean(0)
        return mean / mean.norm().clamp_min(1e-12)
