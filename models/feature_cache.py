"""Content-addressed cache of reference-pass features.

A key names everything a reference pass depends on: the reference pixels (their latents'
digest), the weights of the network that encodes them, the timestep and the context. An
entry maps ``(block key, kind)`` → tensor ``[N, L, C]`` (kind ``"attn1"``: the input of
self-attention, ``norm1(x)``; ``"attn2"``: the hidden state entering cross-attention,
``norm2(x)``). Entries live on the offload device (CPU), bounded by a byte budget with LRU
eviction; optionally they are also written to disk as safetensors, so a re-run after a
restart skips the reference passes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("IDFusion")

#: Default in-memory budget; override with the environment variable IDFUSION_FEATURE_CACHE_MB.
DEFAULT_BUDGET_MB = 4096

BlockKey = tuple[str, int, int]
FeatureKey = tuple[BlockKey, str]
Features = dict[FeatureKey, torch.Tensor]


@dataclass(frozen=True)
class CacheKey:
    """What a reference pass depends on. ``timestep`` is rounded to 1e-4."""

    references: str
    weights: str
    timestep: float
    context: str

    def digest(self) -> str:
        text = f"{self.references}|{self.weights}|{self.timestep:.4f}|{self.context}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of a tensor (on the CPU, contiguous)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def feature_name(key: FeatureKey) -> str:
    (block, number, index), kind = key
    return f"{block}.{number}.{index}.{kind}"


def parse_feature_name(name: str) -> FeatureKey:
    block, number, index, kind = name.split(".")
    return (block, int(number), int(index)), kind


def features_bytes(features: Features) -> int:
    return sum(t.numel() * t.element_size() for t in features.values())


class FeatureCache:
    """LRU over ``CacheKey`` → features, with counters for passes, hits and evictions."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[CacheKey, Features] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.counters = dict(reference_passes=0, hits=0, disk_hits=0, misses=0, evictions=0, disk_writes=0)

    def get(self, key: CacheKey, needed: set[FeatureKey]) -> Features | None:
        """The entry if it holds every needed feature (moved to most recent), else None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and needed <= entry.keys():
                self._entries.move_to_end(key)
                self.counters["hits"] += 1
                return entry
            return None

    def put(self, key: CacheKey, features: Features) -> None:
        size = features_bytes(features)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= features_bytes(old)
            if size > self.budget_bytes:
                return
            self._entries[key] = features
            self._bytes += size
            while self._bytes > self.budget_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= features_bytes(evicted)
                self.counters["evictions"] += 1

    def lookup(self, key: CacheKey, needed: set[FeatureKey], disk: "DiskCache | None",
               compute: Callable[[], Features]) -> tuple[Features, Features | None]:
        """This cache, then ``disk``, else ``compute()`` (a miss; its result kept on the CPU in both).
        Returns (the kept entry, the freshly computed features or None)."""
        entry = self.get(key, needed)
        if entry is None and disk is not None:
            entry = disk.load(key, needed)
            if entry is not None:
                self.count("disk_hits")
                self.put(key, entry)
        if entry is not None:
            return entry, None
        self.count("misses")
        fresh = compute()
        entry = {k: v.detach().to("cpu", copy=True) for k, v in fresh.items()}
        self.put(key, entry)
        if disk is not None:
            disk.save(key, entry)
            self.count("disk_writes")
        return entry, fresh

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def reset(self) -> None:
        """Empty the cache and zero the counters."""
        self.clear()
        with self._lock:
            self.counters = dict.fromkeys(self.counters, 0)

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counters, entries=len(self._entries), bytes=self._bytes, budget_bytes=self.budget_bytes)


def _budget_from_env() -> int:
    try:
        mb = float(os.environ.get("IDFUSION_FEATURE_CACHE_MB", DEFAULT_BUDGET_MB))
    except ValueError:
        logger.warning("IDFUSION_FEATURE_CACHE_MB is not a number; using %d MB", DEFAULT_BUDGET_MB)
        mb = DEFAULT_BUDGET_MB
    return int(mb * 1024 * 1024)


FEATURE_CACHE = FeatureCache(_budget_from_env())


class DiskCache:
    """Entries as ``<folder>/<key digest>.safetensors`` (written atomically)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: CacheKey) -> Path:
        return self.folder / f"{key.digest()}.safetensors"

    def load(self, key: CacheKey, needed: set[FeatureKey]) -> Features | None:
        from safetensors.torch import load_file
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            # clone: fresh, aligned storage, so kernels see the same layout as for computed features
            features = {parse_feature_name(name): t.clone() for name, t in load_file(str(path)).items()}
        except Exception as err:  # a damaged file is a miss, not a failure
            logger.warning("IDFusion feature cache: ignoring unreadable %s (%s)", path, err)
            return None
        return features if needed <= features.keys() else None

    def save(self, key: CacheKey, features: Features) -> None:
        from safetensors.torch import save_file
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        save_file({feature_name(k): v.contiguous() for k, v in features.items()}, str(tmp),
                  metadata={"references": key.references, "weights": key.weights,
                            "timestep": f"{key.timestep:.4f}", "context": key.context})
        os.replace(tmp, path)
