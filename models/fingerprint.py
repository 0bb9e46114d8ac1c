"""The weights a reference pass runs with, as one exact key for the feature cache.

A reference pass reads the sampled UNet (training-free: all of it; FlashFace: its time
embedding, middle block and head) and, for FlashFace, the ReferenceNet's own weights. What
decides those weights, and so what the key covers:

- the UNet's state as loaded: every parameter and buffer, taken from the patcher's backups
  where the host has patched a weight in place (the originals), else from the module;
- the patcher's pending weight patches (LoRAs, model merges, anything ``add_patches`` took),
  its weight wrappers and object patches, and the weight hooks applied at this call;
- for FlashFace, the same for the ReferenceNet's patcher.

Every byte of every tensor enters the key; nothing is sampled. Tensors are hashed on the
patcher's load device, wherever they live at the moment:

- CPU (a CPU load device): SHA-256 of the tensor's bytes, tensors in parallel threads
  (``hashlib`` releases the GIL);
- CUDA: no copy to the host. The bytes, as 16-bit words in rows of ``ROW_WORDS``, are
  multiplied by a fixed matrix of pseudo-random integers in [1, 65535] (``COLUMNS`` columns)
  in float64 on the device (tensors that live on the CPU are streamed there in chunks). Every
  product and partial sum is an integer below 2**53, so the row sums are exact whatever the
  summation order; SHA-256 then hashes them with dtype and shape. A change of any one word
  changes its row's sums (no multiplier is 0); several changes in one row cancel in all
  columns at once with a probability of at most 65535**-8 (< 2**-128).

The two methods give different digests (a tag keeps them apart), so a disk cache written on
a CPU-only machine is not reused on a GPU machine (its features differ anyway).

Cost: a tensor is hashed once while it stays the same object with the same storage and
version (memoized by identity, holding weak references only); the walk over a model's
tensors runs once per sampling run (``begin_run`` is the host's ON_PRE_RUN callback), never
per step. Edits made in place to a weight that keeps its storage and has no version counter
(tensors made under ``torch.inference_mode``, as ComfyUI loads them) are not seen unless they
go through the host's patch mechanism (backups, weight patches, hooks), as the host's own
``clone_has_same_weights`` does not see them either.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: Words (int16) per row: row sums stay below 2**15 · 2**16 · 2**14 = 2**45 < 2**53.
ROW_WORDS = 1 << 14
COLUMNS = 8
SEED = 0x1DF05102
#: Words moved and converted to float64 at once on a CUDA device (64 MiB of float64).
CHUNK_WORDS = 1 << 23
DEPTH = 16                              # nesting followed into patches (cycles are cut anyway)

logger = logging.getLogger("IDFusion")

STATS = dict(tensors_hashed=0, bytes_hashed=0, seconds_hashing=0.0, fingerprints=0, runs=0)

_lock = threading.RLock()
_multipliers: dict[str, torch.Tensor] = {}
_digests: dict[int, tuple] = {}          # id(tensor) → (weakref, signature, digest)
_fingerprints: dict[tuple, tuple] = {}   # run memo: key → (weak references, fingerprint bytes)
_epoch = 0


# --- tensors --------------------------------------------------------------------------------------

def multipliers(device: torch.device) -> torch.Tensor:
    """The fixed [ROW_WORDS, COLUMNS] float64 matrix of integers in [1, 65535] (splitmix64 of the index)."""
    name = str(device)
    with _lock:
        if name not in _multipliers:
            z = np.arange(ROW_WORDS * COLUMNS, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(SEED)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            values = (z >> np.uint64(48)) % np.uint64(65535) + np.uint64(1)
            _multipliers[name] = torch.from_numpy(values.astype(np.float64)).reshape(ROW_WORDS, COLUMNS).to(device)
        return _multipliers[name]


def hash_device(device) -> torch.device:
    """Where tensors are hashed: a CUDA load device, else the CPU (SHA-256 of the bytes)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return device if device.type == "cuda" else torch.device("cpu")


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat int16 tensor (a zero byte appended to an odd length)."""
    data = t.detach().reshape(-1).view(torch.uint8)
    if data.numel() % 2:
        data = torch.cat([data, data.new_zeros(1)])
    return data.view(torch.int16)


def row_sums(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[rows, COLUMNS] int64: the exact row sums of ``t``'s words times ``multipliers`` (see module docstring)."""
    words = _words(t)
    m = multipliers(device)
    full = words.numel() // ROW_WORDS
    step = max(1, CHUNK_WORDS // ROW_WORDS)
    parts = []
    for start in range(0, full, step):
        rows = min(step, full - start)
        chunk = words[start * ROW_WORDS:(start + rows) * ROW_WORDS].to(device).view(rows, ROW_WORDS)
        parts.append(chunk.to(torch.float64) @ m)
    tail = words[full * ROW_WORDS:]
    if tail.numel():
        parts.append(tail.to(device).to(torch.float64) @ m[:tail.numel()])
        parts[-1] = parts[-1].view(1, COLUMNS)
    if not parts:
        return torch.zeros(0, COLUMNS, dtype=torch.int64)
    return torch.cat(parts).to(torch.int64).cpu()


def _plain(t: torch.Tensor) -> bool:
    """A tensor (or Parameter) of plain storage, not a subclass such as a quantized weight."""
    return type(t.data) is torch.Tensor


def _signature(t: torch.Tensor, device: torch.device) -> tuple:
    """What must stay the same for a memoized digest to hold (and the hashing device's kind)."""
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), str(t.device), version,
            device.type)


def _forget(key: int, ref) -> None:
    with _lock:
        entry = _digests.get(key)
        if entry is not None and entry[0] is ref:
            del _digests[key]


def _bytes_digest(t: torch.Tensor, device: torch.device) -> bytes:
    """The exact digest of one plain tensor, by the method of ``device`` (see module docstring)."""
    header = f"{t.dtype}|{tuple(t.shape)}|".encode()
    if device.type == "cuda":
        return hashlib.sha256(b"rows|" + header + row_sums(t, device).numpy().tobytes()).digest()
    h = hashlib.sha256(b"sha256|" + header)
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def _memo_get(t: torch.Tensor, device: torch.device) -> bytes | None:
    with _lock:
        entry = _digests.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == _signature(t, device):
            return entry[2]
    return None


def _memo_put(t: torch.Tensor, device: torch.device, digest: bytes, seconds: float) -> None:
    key = id(t)
    with _lock:
        STATS["tensors_hashed"] += 1
        STATS["bytes_hashed"] += t.numel() * t.element_size()
        STATS["seconds_hashing"] += seconds
        try:
            ref = weakref.ref(t, lambda r, k=key: _forget(k, r))
        except TypeError:
            return
        _digests[key] = (ref, _signature(t, device), digest)


def _timed_digest(t: torch.Tensor, device: torch.device) -> tuple[bytes, float]:
    start = time.perf_counter()
    return _bytes_digest(t, device), time.perf_counter() - start


def tensor_digests(tensors: list, device: torch.device) -> list[bytes]:
    """Exact digests of tensors, memoized; on the CPU the new ones are hashed in parallel threads."""
    out: list = [None] * len(tensors)
    todo = []
    for i, t in enumerate(tensors):
        if not _plain(t):
            out[i] = _object_digest(t, device)
        else:
            out[i] = _memo_get(t, device)
            if out[i] is None:
                todo.append(i)
    workers = min(len(todo), torch.get_num_threads()) if device.type == "cpu" else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda i: _timed_digest(tensors[i], device), todo))
    else:
        results = [_timed_digest(tensors[i], device) for i in todo]
    for i, (digest, seconds) in zip(todo, results):
        _memo_put(tensors[i], device, digest, seconds)
        out[i] = digest
    return out


def tensor_digest(t: torch.Tensor, device: torch.device) -> bytes:
    """The exact digest of one tensor (memoized while it keeps its storage and version)."""
    return tensor_digests([t], device)[0]


# --- any value: patches, adapters, hooks ------------------------------------------------------------

def _function_parts(fn) -> list:
    """What a Python function's result depends on besides its arguments: where and what its code
    is, its defaults and the values its closure holds."""
    code = fn.__code__
    cells = [c.cell_contents for c in (fn.__closure__ or ()) if _cell_filled(c)]
    return [f"{fn.__module__}.{fn.__qualname__}:{code.co_firstlineno}", code.co_code, fn.__defaults__,
            fn.__kwdefaults__, cells]


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _feed(h, value, device, depth: int, seen: set) -> None:
    """Feed a canonical encoding of ``value`` (tensors by exact digest) into hash ``h``. What
    cannot be encoded by content (nesting deeper than ``DEPTH``, bound methods, objects without
    attributes) is encoded by identity: a key that misses, never one that is shared wrongly."""
    if isinstance(value, torch.Tensor):
        h.update(b"T" + tensor_digest(value, device))
        return
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
        return
    kind = type(value)
    h.update(f"<{kind.__module__}.{kind.__qualname__}>".encode())
    if id(value) in seen:
        h.update(b"^")
        return
    if depth <= 0:
        h.update(f"@{id(value)}".encode())
        return
    seen = seen | {id(value)}
    if isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for item in value:
            _feed(h, item, device, depth - 1, seen)
    elif isinstance(value, dict):
        h.update(f"{{{len(value)}".encode())
        for k in sorted(value, key=repr):
            _feed(h, k, device, depth - 1, seen)
            _feed(h, value[k], device, depth - 1, seen)
    elif isinstance(value, (set, frozenset)):
        h.update(repr(sorted(repr(v) for v in value)).encode())
    elif isinstance(value, torch.nn.Module):
        _feed(h, dict(value.state_dict(keep_vars=True)), device, depth - 1, seen)
    elif isinstance(value, functools.partial):
        _feed(h, [value.func, value.args, value.keywords], device, depth - 1, seen)
    elif inspect.isfunction(value):
        _feed(h, _function_parts(value), device, depth - 1, seen)
    elif isinstance(value, type) or inspect.isbuiltin(value):
        h.update(f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}".encode())
    elif hasattr(value, "__dict__") and not inspect.ismethod(value):
        _feed(h, dict(vars(value)), device, depth - 1, seen)
    else:
        h.update(f"@{id(value)}".encode())


def _object_digest(t: torch.Tensor, device) -> bytes:
    """A tensor subclass (e.g. a quantized weight): its type, dtype, shape and attributes (its
    storage tensors by exact digest)."""
    h = hashlib.sha256(f"{type(t).__qualname__}|{t.dtype}|{tuple(t.shape)}|".encode())
    _feed(h, dict(vars(t)), device, DEPTH, set())
    return h.digest()


def value_digest(value, device) -> bytes:
    """SHA-256 of a canonical encoding of any value: patches, adapter objects, hooks."""
    h = hashlib.sha256()
    _feed(h, value, device, DEPTH, set())
    return h.digest()


# --- models and patchers ----------------------------------------------------------------------------

def originals(patcher) -> dict:
    """{state key: tensor} of weights the host has patched in place: the originals it keeps."""
    if patcher is None:
        return {}
    found = {key: entry[0] for key, entry in getattr(patcher, "hook_backup", {}).items()}
    found.update({key: entry.weight for key, entry in getattr(patcher, "backup", {}).items()})
    return found


def module_digest(module: torch.nn.Module, patcher, prefix: str, device) -> bytes:
    """SHA-256 over every parameter and buffer of ``module`` (names included), each as loaded."""
    backups = originals(patcher)
    state = module.state_dict(keep_vars=True)
    digests = tensor_digests([backups.get(prefix + name, tensor) for name, tensor in state.items()], device)
    h = hashlib.sha256()
    for name, digest in zip(state, digests):
        h.update(name.encode() + b"=" + digest)
    return h.digest()


def patches_digest(patcher, device) -> bytes:
    """SHA-256 of a patcher's pending weight patches, weight wrappers and object patches."""
    if patcher is None:
        return b""
    return value_digest([getattr(patcher, "patches", {}), getattr(patcher, "weight_wrapper_patches", {}),
                         getattr(patcher, "object_patches", {})], device)


def hooks_digest(patcher, device) -> bytes:
    """The weight hooks applied to the model right now, with their current strengths (b"" without)."""
    hooks = getattr(patcher, "current_hooks", None)
    if hooks is None:
        return b""
    combined = patcher.get_combined_hook_patches(hooks=hooks)
    return value_digest(combined, device)


# --- the key ----------------------------------------------------------------------------------------------

def begin_run(patcher=None) -> None:
    """The host's ON_PRE_RUN callback: the next reference pass re-reads the weights' state."""
    global _epoch
    with _lock:
        _epoch += 1
        _fingerprints.clear()
        STATS["runs"] += 1


def _alive(refs) -> bool:
    return all(r() is not None for r in refs)


def _weak(*objects):
    return tuple(weakref.ref(o) for o in objects if o is not None)


def weights_fingerprint(base_model, refnet) -> str:
    """The key of the weights a reference pass of ``refnet`` runs with on ``base_model`` (hex, 32)."""
    patcher = getattr(base_model, "current_patcher", None)
    modules = getattr(refnet, "modules", None)
    ref_patcher = None if modules is None else modules.patcher
    device = hash_device(getattr(patcher, "load_device", None) or getattr(base_model, "device", None))
    key = (_epoch, id(base_model), id(patcher), getattr(patcher, "patches_uuid", None), id(ref_patcher),
           getattr(ref_patcher, "patches_uuid", None), refnet.kind)
    with _lock:
        entry = _fingerprints.get(key)
    if entry is not None and _alive(entry[0]):
        base = entry[1]
    else:
        before, start = stats(), time.perf_counter()
        h = hashlib.sha256(f"{refnet.kind}|".encode())
        h.update(module_digest(base_model.diffusion_model, patcher, "diffusion_model.", device))
        h.update(patches_digest(patcher, device))
        if modules is not None:
            h.update(module_digest(modules.module, ref_patcher, "", device))
            h.update(patches_digest(ref_patcher, device))
        base = h.digest()
        with _lock:
            _fingerprints[key] = (_weak(base_model, patcher, ref_patcher), base)
            STATS["fingerprints"] += 1
        hashed = stats()["bytes_hashed"] - before["bytes_hashed"]
        if hashed:
            logger.info("IDFusion: hashed %.1f MB of new weights for the feature cache's key on %s in %.1f s",
                        hashed / 2 ** 20, device, time.perf_counter() - start)
    hooks = hooks_digest(patcher, device)
    return hashlib.sha256(base + hooks).hexdigest()[:32] if hooks else base.hex()[:32]


def stats() -> dict:
    with _lock:
        return dict(STATS)
