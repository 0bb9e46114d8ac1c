#!/usr/bin/env python3
"""What IDFusion's patches cost at sampling time, as ratios measured in one run.

    OMP_NUM_THREADS=1 .host/venv/bin/python tools/benchmark.py           # CPU: 512 px, 1/2/4 references
    .host/venv/bin/python tools/benchmark.py --device cuda                # GPU: 512 and 768 px, fp16
    .host/venv/bin/python tools/benchmark.py --quick                      # tiny UNet: a smoke check, seconds
    OMP_NUM_THREADS=1 .host/0.33.0/venv/bin/python tools/benchmark.py --only dit  # DiTs (0.17.0+)

The model is a full-size SD1.5 UNet with random weights, built in memory with ComfyUI's own
classes (fp32 on the CPU, fp16 on CUDA); references are random 28×28 latents (224 px crops)
with a random null context, in training-free mode. Every timing is one ``apply_model`` call
of the real patched MODEL at batch 2 (two guidance branches, ``cond_or_uncond`` [0, 1], as
``calc_cond_batch`` makes it), divided by the same call of the unpatched MODEL. Cases are
interleaved round by round, so a change of machine load reaches all of them alike; each
figure is the median of ``--repeats`` rounds. See docs/benchmark.md for how to read the table.

``--only dit`` measures the DiT nodes instead, on a Flux.1 (Kontext) of the real width with fewer
blocks (every block is patched, so the ratios are per block): routing people's native
references against the same call with native references, and training-free reference
attention against the call without references (section "DiT" below).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from idf_testlib import consistentid_fixtures as CF  # noqa: E402
from idf_testlib import engine as E  # noqa: E402
from idf_testlib import face_fixtures as FF  # noqa: E402
from idf_testlib import host as H  # noqa: E402
from idf_testlib import models as M  # noqa: E402
from idf_testlib.paths import ARTIFACTS, COMFY  # noqa: E402

REF_LATENT = 28                     # 224 px reference crops
QUICK_REF_LATENT = 8                # --quick: 64 px crops for the tiny UNet
STRENGTH = 0.85                     # λ_feat (FlashFace default)
ALL_BLOCKS = "all (input + middle + output)"
TRAINING_FREE_ADAPTER = "training-free (self-attention projections)"
MIX, REGION = "mix (weights)", "by region (identity masks)"
CFG = 5.0

#: Row labels of the results table, in order (the smoke test checks them).
ROWS = {
    "unpatched": "unpatched forward, batch 2 (s)",
    "cold": "reference attention, cold (× unpatched)",
    "cached": "reference attention, cached (× unpatched)",
    "bound": "lower bound: one attention over [self; refs] (× unpatched)",
    "vs_bound": "cached / lower bound (target ≤ 1.15)",
    "doubling": "batch-doubling reference-only, forward at batch 2+N (× unpatched)",
    "fused_1": "fused KV, 1 identity (× unpatched, cached)",
    "fused_2": "fused KV, 2 identities (× unpatched, cached)",
    "fused_2_masked": "fused KV, 2 identities, masked (× unpatched, cached)",
    "consistentid": "ConsistentID: LoRA + ID tokens in every cross-attention (× unpatched)",
    "memory": "peak memory growth, MiB: unpatched / cold / cached",
    "passes": "reference passes, sampling run 1 / run 2 (target: run 2 = 0)",
    "syncs": "host-device synchronisations in one cached call (CUDA; target 1: the timestep)",
    "consistentid_encode": "ConsistentID encoding of one 512 px photo, s: cold / cached",
    "weights_key": "weights key of the feature cache: newly loaded model, s (GB/s) / each later run, ms",
}


def log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


# --- host and model ---------------------------------------------------------------------------

def boot_host(device: str, attention: str) -> None:
    """ComfyUI in process. The test harness's ``boot()`` forces the CPU; on CUDA the same
    steps run without that. attention ``pytorch`` sets ``--use-pytorch-cross-attention``."""
    if str(COMFY) not in sys.path:
        sys.path.insert(0, str(COMFY))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.use_pytorch_cross_attention = attention == "pytorch"
    if device == "cpu":
        H.boot()
        return
    args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401  (reads args at import)
    H.register_pack()
    H._booted = True


def build_model(quick: bool, device: torch.device, dtype: torch.dtype):
    """A ModelPatcher around a random-weight SD1.5 UNet (full size, or tiny with ``quick``)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    config = M.sd15_unet_config(**M.SD15_TINY) if quick else M.sd15_unet_config()
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    M.init_weights(model.diffusion_model, seed=0)
    model.diffusion_model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    if device.type == "cuda":
        mm.load_models_gpu([patcher])
    return patcher, config["context_dim"]


# --- patched models ---------------------------------------------------------------------------

def reference_model(model, features):
    from IDFusion.nodes.reference import AUTO, ReferenceAttention
    return ReferenceAttention.execute(model, features, STRENGTH, 0.0, 1.0, AUTO, MIX, "all").result[0]


def fused_model(model, features, masks=None):
    from IDFusion.models.masks import IdentityMasks
    from IDFusion.nodes.fusion import FusedKV
    mode, id_masks = MIX, None
    if masks is not None:
        mode, id_masks = REGION, IdentityMasks(masks, tuple(f"id{i}" for i in range(masks.shape[0])))
    return FusedKV.execute(model, features, 1.0, 0.0, 1.0, ALL_BLOCKS, TRAINING_FREE_ADAPTER, mode, "all",
                           identity_masks=id_masks).result[0]


def two_regions(height: int, width: int) -> torch.Tensor:
    """Left and right halves at image size: [2, H, W]."""
    masks = torch.zeros(2, height, width)
    masks[0, :, : width // 2] = 1
    masks[1, :, width // 2:] = 1
    return masks


def plan_features(patched, timestep: float, device, dtype) -> dict:
    """Every identity's features at ``timestep`` for a patched MODEL's plan: from the cache,
    or by a reference pass that fills it (what the engine does at a call)."""
    from IDFusion.models.engine import PLAN, identity_features
    plan = patched.model_options["transformer_options"][PLAN]
    base = patched.model
    out = {}
    for spec in plan.specs:
        for ident in spec.features.identities:
            out[id(ident)] = identity_features(base, spec.features, ident, timestep, spec.needs(), device, dtype)
    return out


class ConcatAttention:
    """attn1 replace: one attention of the block's queries over [own keys; reference keys],
    with the references' keys/values projected beforehand: the extra attention work the
    reference patch cannot avoid, and nothing else (no λ blend, no reference pass)."""

    def __init__(self, k_ref: torch.Tensor, v_ref: torch.Tensor):
        self.k_ref, self.v_ref = k_ref, v_ref

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention
        b = q.shape[0]
        k = torch.cat([k, self.k_ref.expand(b, -1, -1)], dim=1)
        v = torch.cat([v, self.v_ref.expand(b, -1, -1)], dim=1)
        return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                   transformer_options=extra_options)


def lower_bound_model(model, patched, timestep: float, device, dtype):
    """The unpatched MODEL with each block the reference patch touches replaced by ``ConcatAttention``."""
    from IDFusion.models.engine import PLAN
    from IDFusion.nodes.unet_blocks import transformer_blocks
    spec = patched.model_options["transformer_options"][PLAN].specs[0]
    feats = plan_features(patched, timestep, device, dtype)
    blocks = transformer_blocks(model.model.diffusion_model)
    m = model.clone()
    for key in spec.blocks:
        per_identity = [feats[id(i)][(key, "attn1")] for i in spec.features.identities]         # [N, L, C] each
        tokens = torch.cat([t.reshape(1, -1, t.shape[-1]) for t in per_identity], dim=1)         # [1, ΣN·L, C]
        attn1 = blocks[key].attn1
        m.set_model_attn1_replace(ConcatAttention(attn1.to_k(tokens), attn1.to_v(tokens)), *key)
    return m


def consistentid_weights(quick: bool):
    """ConsistentID weights in the official layout (random): full size, or for the tiny UNet."""
    from IDFusion.models.consistentid.weights import from_groups
    channels = (32, 64, 128, 128) if quick else (320, 640, 1280, 1280)
    groups = CF.official_groups(CF.processor_names("sd15"), channels, **(CF.TINY if quick else CF.FULL))
    return from_groups(groups, "benchmark-ConsistentID-v1.bin", f"benchmark-{quick}")


def consistentid_model(model, weights):
    """The MODEL patched by ConsistentID Apply (official strengths) for one person."""
    from IDFusion.models.consistentid.face import ConsistentIDFaces
    from IDFusion.nodes.consistentid import ConsistentIDApply
    faces = ConsistentIDFaces(weights, (CF.random_face(weights),), (1.0,))
    return ConsistentIDApply.execute(model, weights, faces, 1.0, 1.0, MIX, "all").result[0]


def consistentid_encoding(weights, quick: bool) -> tuple[float, float]:
    """Seconds of the one-time encoding of a 512 px photo (ArcFace, parsing, CLIP vision of the photo and
    its regions, FacialEncoder, ID projection): fresh, then served by the content cache."""
    import comfy.clip_vision
    import comfy.model_management as mm
    import comfy.model_patcher
    from facexlib.parsing.bisenet import BiSeNet
    from IDFusion.models.consistentid.face import ARCFACE_RGB, ENCODINGS, NO_FACE_ERROR, encode_cached
    from IDFusion.models.faces.analysis import load_analyzer
    from IDFusion.models.faces.parsing import FaceParser
    if quick:
        vision = CF.tiny_clip_vision()
    else:
        config = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json"
        vision = comfy.clip_vision.ClipVisionModel(str(config))
        M.init_weights(vision.model, seed=6)
    bisenet = BiSeNet(num_class=19).eval()
    bisenet.load_state_dict(CF.parser_state())
    parser = FaceParser(comfy.model_patcher.ModelPatcher(bisenet, mm.get_torch_device(), mm.unet_offload_device()),
                        "benchmark")
    FF.insightface_pack("buffalo_l")
    analyzer = load_analyzer("buffalo_l", "CPU", 640)
    photo = FF.scene(512, 512, [FF.MarkerFace(256, 240, 110, 140)], seed=2)
    ENCODINGS.reset()
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        encode_cached(weights, vision, analyzer, parser, photo, "benchmark", ARCFACE_RGB, NO_FACE_ERROR, "benchmark")
        seconds.append(time.perf_counter() - start)
    if ENCODINGS.stats() != {"encodings": 1, "hits": 1, "entries": 1}:
        raise RuntimeError(f"the ConsistentID encoding cache did not serve the second call: {ENCODINGS.stats()}")
    return seconds[0], seconds[1]


# --- one call, timed ------------------------------------------------------------------------------

@dataclass
class Inputs:
    x: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor


def make_inputs(rows: int, latent: int, width: int, sigma: float, device, dtype, seed: int = 0) -> Inputs:
    x = torch.randn(rows, 4, latent, latent, generator=E.gen(seed)).to(device=device, dtype=dtype)
    context = torch.randn(rows, 77, width, generator=E.gen(seed + 1)).to(device=device, dtype=dtype)
    return Inputs(x, torch.full((rows,), sigma, device=device), context)


def call_options(patcher) -> dict:
    """The MODEL's transformer_options with its wrappers merged in, as sampling prepares them
    (``comfy.sampler_helpers.prepare_model_patcher``)."""
    import comfy.patcher_extension
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(options.get("wrappers", {}), patcher.wrappers)
    return options


def apply_model(patcher, inputs: Inputs) -> torch.Tensor:
    """One UNet call as ``calc_cond_batch`` makes it: the MODEL's transformer_options and
    wrappers plus the rows' cond indices (cond, uncond), uuids and sigmas."""
    options = call_options(patcher)
    options.update(cond_or_uncond=[0, 1], uuids=[uuid.uuid4(), uuid.uuid4()], sigmas=inputs.sigma)
    return patcher.model.apply_model(inputs.x, inputs.sigma, c_crossattn=inputs.context, transformer_options=options)


class RssPeak:
    """The process's resident set size, sampled by a thread every ``interval`` seconds
    (psutil, or /proc/self/statm without it): ``start`` and ``peak`` in bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        try:
            import psutil
            process = psutil.Process()
            self._read = lambda: process.memory_info().rss
        except ImportError:
            page = os.sysconf("SC_PAGE_SIZE")
            self._read = lambda: int(open("/proc/self/statm").read().split()[1]) * page
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the next call's RSS growth is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Timing:
    wall: float         # seconds, perf_counter (CUDA: synchronised before and after)
    cpu: float          # seconds of this thread's CPU time (all the work when torch runs one thread)
    peak: float         # bytes of peak memory growth


def timed_call(fn: Callable[[], object], device: torch.device) -> Timing:
    """One call. Memory: on CUDA the growth of ``max_memory_allocated`` over what was allocated
    before; on the CPU the growth of the sampled RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        return Timing(wall, cpu, torch.cuda.max_memory_allocated(device) - before)
    _trim_heap()
    with RssPeak() as rss:
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    return Timing(wall, cpu, rss.peak - rss.start)


# --- cases ----------------------------------------------------------------------------------------

def reference_passes() -> int:
    from IDFusion.models.feature_cache import FEATURE_CACHE
    return FEATURE_CACHE.stats()["reference_passes"]


@dataclass
class Case:
    """One configuration timed in every round. ``setup`` runs untimed before each call;
    ``passes`` is the number of reference passes each call must run (checked)."""

    key: str
    refs: int | None
    run: Callable[[], object]
    setup: Callable[[], None] | None = None
    passes: int = 0
    timings: list[Timing] = field(default_factory=list)
    clock: str = "wall"

    @property
    def times(self) -> list[float]:
        """Seconds per timed call on the clock the report uses."""
        return [getattr(t, self.clock) for t in self.timings]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def peak(self) -> float:
        return max(t.peak for t in self.timings)


def measure(cases: list[Case], rounds: int, warmup: int, device: torch.device, clock: str, label: str) -> None:
    """``warmup`` untimed rounds, then ``rounds`` timed rounds; every round runs every case once."""
    for r in range(warmup + rounds):
        timed = r >= warmup
        for case in cases:
            case.clock = clock
            if case.setup is not None:
                case.setup()
            before = reference_passes()
            timing = timed_call(case.run, device)
            ran = reference_passes() - before
            if ran != case.passes:
                raise RuntimeError(f"{case.key} (N={case.refs}) ran {ran} reference passes, expected {case.passes}: "
                                   f"the benchmark is not measuring what it says")
            if timed:
                case.timings.append(timing)
            log(f"{label} {'round ' + str(r - warmup + 1) if timed else 'warm-up'}: {case.key:16s} "
                f"N={case.refs if case.refs is not None else '-'}  wall {timing.wall:8.3f} s  cpu {timing.cpu:8.3f} s")


def size_cases(model, width: int, size: int, refs: list[int], ref_latent: int, device, dtype,
               consistentid=None) -> tuple[list[Case], dict]:
    """Every timed case at one image size, and the patched MODELs by (kind, N); with ``refs`` empty,
    the unpatched and ConsistentID cases only."""
    from IDFusion.models.feature_cache import FEATURE_CACHE
    latent = size // 8
    sigma = float(model.model.model_sampling.percent_to_sigma(0.5))
    timestep = float(model.model.model_sampling.timestep(torch.tensor([sigma])).float()[0])
    main = make_inputs(2, latent, width, sigma, device, dtype)
    base = Case("unpatched", None, lambda: apply_model(model, main))
    cases, patched = [base], {}
    if consistentid is not None:
        cases.append(Case("consistentid", None, lambda m=consistentid: apply_model(m, main)))
    for n in refs:
        ident_a = E.identity(10 + n, count=n, latent=ref_latent, label="a", width=width)
        ident_b = E.identity(20 + n, count=n, latent=ref_latent, label="b", width=width)
        one = E.training_free_features(model, ident_a)
        two = E.training_free_features(model, ident_a, ident_b)
        ref = reference_model(model, one)
        patched[("reference", n)] = ref
        bound = lower_bound_model(model, ref, timestep, device, dtype)
        doubled = make_inputs(2 + n, latent, width, sigma, device, dtype)
        fused = {"fused_1": fused_model(model, one), "fused_2": fused_model(model, two),
                 "fused_2_masked": fused_model(model, two, two_regions(size, size))}

        def fill(m=ref):
            plan_features(m, timestep, device, dtype)

        cases += [
            Case("bound", n, lambda m=bound: apply_model(m, main)),
            Case("cold", n, lambda m=ref: apply_model(m, main), setup=FEATURE_CACHE.clear, passes=1),
            Case("cached", n, lambda m=ref: apply_model(m, main), setup=fill),
            Case("doubling", n, lambda x=doubled: apply_model(model, x)),
        ]
        for key, m in fused.items():
            cases.append(Case(key, n, lambda m=m: apply_model(m, main), setup=lambda m=m: fill(m)))
    return cases, patched


def count_syncs(run: Callable[[], object]) -> int:
    """Host-device synchronisations during ``run`` on CUDA, as ``torch.cuda.set_sync_debug_mode``
    reports them (one warning each)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
            torch.cuda.current_stream().synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def call_syncs(patched, width: int, size: int, device, dtype) -> int:
    """Synchronisations in one cached call of a patched MODEL at batch 2."""
    model = patched.model
    sigma = float(model.model_sampling.percent_to_sigma(0.5))
    timestep = float(model.model_sampling.timestep(torch.tensor([sigma])).float()[0])
    plan_features(patched, timestep, device, dtype)
    inputs = make_inputs(2, size // 8, width, sigma, device, dtype)
    apply_model(patched, inputs)                                     # memos (fingerprint, percent sigmas) filled
    return count_syncs(lambda: apply_model(patched, inputs))


def sampling_passes(patched, width: int, size: int, steps: int) -> tuple[int, int]:
    """Reference passes counted in two identical short samplings (comfy.sample.sample, cfg > 1)."""
    from IDFusion.models.feature_cache import FEATURE_CACHE
    FEATURE_CACHE.clear()
    positive, negative = E.conditioning(5, width), E.conditioning(6, width)
    counts = []
    for _ in range(2):
        before = reference_passes()
        E.sample(patched, seed=0, steps=steps, cfg=CFG, size=size // 8, positive=positive, negative=negative)
        counts.append(reference_passes() - before)
    return counts[0], counts[1]


# --- DiT -----------------------------------------------------------------------------------------------

#: Flux.1 (dev / Kontext) at its real width: 3072 wide, 24 heads of 128, MLP ×4, T5 text 4096 wide;
#: one double and two single blocks (the full model has 19 and 38).
DIT_WIDTH = dict(hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], context_in_dim=4096, vec_in_dim=768,
                 depth=1, depth_single_blocks=2)
DIT_FULL_BLOCKS = 19 + 38
DIT_TEXT = 512                      # Flux's T5 tokens
DIT_ROWS = {
    "dit_none": "no references, batch 1 (s)",
    "dit_native": "native references (× no references)",
    "dit_people": "people at strength 1.5, no masks (× native references)",
    "dit_routed": "people routed by region (× native references; target ≤ 1.10)",
    "dit_tf_cached": "training-free reference attention, cached (× no references; target ≤ 1.15 for 1 reference)",
    "dit_tf_cold": "training-free reference attention, cold (× no references)",
    "dit_bytes": "reference keys/values per reference image per step, MiB: this model / Flux.1 (57 blocks, bf16)",
}


def build_dit(quick: bool, device: torch.device, dtype: torch.dtype):
    """A ModelPatcher around a random Flux.1 of the real width (``DIT_WIDTH``), or the tests' tiny one."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from idf_testlib import dit_models as D
    config = comfy.supported_models.Flux({**D.FLUX_TINY, **({} if quick else DIT_WIDTH)})
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    M.init_weights(model.diffusion_model, seed=0)
    model.diffusion_model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    if device.type == "cuda":
        mm.load_models_gpu([patcher])
    return patcher


@dataclass
class DitInputs:
    x: torch.Tensor
    sigma: torch.Tensor
    kwargs: dict


def dit_inputs(model, latent: int, refs: int, device, dtype, text: int) -> DitInputs:
    """One image latent and ``refs`` reference latents of the same size, random text: batch 1."""
    dm = model.model.diffusion_model
    g = E.gen(3)
    x = torch.randn(1, 16, latent, latent, generator=g).to(device=device, dtype=dtype)
    context = torch.randn(1, text, dm.params.context_in_dim, generator=g)
    kwargs = dict(c_crossattn=context.to(device=device, dtype=dtype),
                  y=torch.randn(1, dm.params.vec_in_dim, generator=g).to(device=device, dtype=dtype),
                  guidance=torch.full((1,), 3.5, device=device))
    if refs:
        kwargs["ref_latents"] = [torch.randn(1, 16, latent, latent, generator=g).to(device=device, dtype=dtype)
                                 for _ in range(refs)]
    return DitInputs(x, torch.full((1,), 0.5, device=device), kwargs)


def dit_call(patcher, inputs: DitInputs) -> torch.Tensor:
    options = call_options(patcher)
    options.update(cond_or_uncond=[0], uuids=[uuid.uuid4()], sigmas=inputs.sigma)
    return patcher.model.apply_model(inputs.x, inputs.sigma, transformer_options=options, **inputs.kwargs)


def people_model(model, people: int, size: int, routed: bool):
    """IDFusion DiT Identity References' patch for ``people`` persons of one reference image each:
    unmasked at strength 1.5 (at 1 everywhere the host's own attention runs), or each person in
    one vertical strip of the picture at strength 1."""
    from IDFusion.models.dit.engine import PeopleSpec
    from IDFusion.models.dit.families import dit_blocks, family_of
    from IDFusion.models.engine import MODE_MIX, MODE_REGION, Routing
    from IDFusion.models.masks import column_masks
    from IDFusion.nodes.dit import current_plan, install
    m = model.clone()
    masks = column_masks(people + 1 if people == 1 else people, size, size)[:people]
    routing = Routing(MODE_REGION, masks, "all") if routed else Routing(MODE_MIX)
    blocks = frozenset(dit_blocks(m.model.diffusion_model, family_of(m.model)))
    strength = 1.0 if routed else 1.5
    install(m, current_plan(m).with_people(PeopleSpec("benchmark", 0, (1,) * people, (strength,) * people, routing,
                                                      blocks)))
    return m


def training_free_model(model, identities: int, latent: int, text: int):
    """IDFusion DiT Reference Attention (all blocks, λ 0.85, timestep-zero references) with
    ``identities`` identities of one reference image each, mixed."""
    from IDFusion.models.references import ReferenceFeatures, ReferenceIdentity
    from IDFusion.nodes.dit import BLOCKS_ALL, TIMESTEP_ZERO, DiTReferenceAttention, dit_reference_net
    dm = model.model.diffusion_model
    idents = tuple(ReferenceIdentity(f"id{i}", torch.randn(1, 16, latent, latent, generator=E.gen(40 + i)),
                                     torch.randn(1, text, dm.params.context_in_dim, generator=E.gen(50 + i)),
                                     torch.randn(1, dm.params.vec_in_dim, generator=E.gen(60 + i)))
                   for i in range(identities))
    features = ReferenceFeatures(dit_reference_net(), idents, (1.0,) * identities)
    return DiTReferenceAttention.execute(model, features, STRENGTH, 0.0, 1.0, BLOCKS_ALL, TIMESTEP_ZERO,
                                         MIX, "all").result[0]


def dit_fill(patched, device) -> None:
    """Put the training-free patch's reference keys/values (timestep zero, guidance 3.5 as in
    ``dit_inputs``) in the cache, as the engine does at a call, without the call."""
    from IDFusion.models.dit.engine import PLAN, identity_features
    for spec in patched.model_options["transformer_options"][PLAN].references:
        for ident in spec.features.identities:
            identity_features(patched.model, ident, 0.0, 3.5, spec.needs(), device, None)


def dit_cases(model, size: int, device, dtype, text: int) -> list[Case]:
    from IDFusion.models.feature_cache import FEATURE_CACHE
    latent = size // 8
    plain = dit_inputs(model, latent, 0, device, dtype, text)
    cases = [Case("dit_none", None, lambda: dit_call(model, plain))]
    for people in (1, 2):
        native = dit_inputs(model, latent, people, device, dtype, text)
        unmasked, routed = people_model(model, people, size, False), people_model(model, people, size, True)
        tf = training_free_model(model, people, latent, text)
        cases += [
            Case("dit_native", people, lambda x=native: dit_call(model, x)),
            Case("dit_people", people, lambda m=unmasked, x=native: dit_call(m, x)),
            Case("dit_routed", people, lambda m=routed, x=native: dit_call(m, x)),
            Case("dit_tf_cached", people, lambda m=tf: dit_call(m, plain), setup=lambda m=tf: dit_fill(m, device)),
            Case("dit_tf_cold", people, lambda m=tf: dit_call(m, plain), setup=FEATURE_CACHE.clear, passes=people),
        ]
    return cases


def dit_reference_bytes(model, size: int, device, dtype, text: int) -> tuple[float, float]:
    """Bytes of one reference image's keys/values over all blocks (one step): measured in the
    cache for this model, and the same tokens at full Flux.1 (57 blocks, 3072 wide, bf16)."""
    from IDFusion.models.feature_cache import FEATURE_CACHE
    FEATURE_CACHE.clear()
    dit_call(training_free_model(model, 1, size // 8, text), dit_inputs(model, size // 8, 0, device, dtype, text))
    measured = FEATURE_CACHE.stats()["bytes"]
    tokens = (size // 16) ** 2
    return measured, 2 * tokens * 3072 * 2 * DIT_FULL_BLOCKS


def dit_table(size: int, by: dict, reference_bytes: tuple[float, float]) -> str:
    lines = ["| measure | size | 1 person | 2 people |", "|---|---|---|---|"]
    t0 = by[("dit_none", None)].median

    def row(key: str, cells: list[str]) -> None:
        lines.append(f"| {DIT_ROWS[key]} | {size} px | " + " | ".join(cells) + " |")

    row("dit_none", [f"{t0:.3f}"] * 2)
    row("dit_native", [_ratio(by[("dit_native", p)].median / t0) for p in (1, 2)])
    for key in ("dit_people", "dit_routed"):
        row(key, [_ratio(by[(key, p)].median / by[("dit_native", p)].median) for p in (1, 2)])
    for key in ("dit_tf_cached", "dit_tf_cold"):
        row(key, [_ratio(by[(key, p)].median / t0) for p in (1, 2)])
    row("dit_bytes", [f"{_mib(reference_bytes[0])} / {_mib(reference_bytes[1])}"] * 2)
    return "\n".join(lines)


def dit_main(args, device: torch.device, dtype: torch.dtype, start: float) -> int:
    from IDFusion.models.dit.host import hooks_available
    if not hooks_available():
        raise SystemExit("--only dit needs a ComfyUI with the DiT hooks (0.17.0 or newer): run it with the 0.33 host")
    text = 16 if args.quick else DIT_TEXT
    model = build_dit(args.quick, device, dtype)
    log(f"{'tiny' if args.quick else 'Flux-width'} DiT built in {time.monotonic() - start:.1f} s on "
        f"{device_words(device)}")
    size = args.sizes[0]
    cases = dit_cases(model, size, device, dtype, text)
    timed_call(cases[0].run, device)                                             # process warm-up
    measure(cases, args.repeats, args.warmup, device, args.clock, f"DiT {size} px")
    by = {(c.key, c.refs): c for c in cases}
    reference_bytes = dit_reference_bytes(model, size, device, dtype, text)
    table = dit_table(size, by, reference_bytes)
    header = (f"# IDFusion DiT benchmark: {device_words(device)}\n\n"
              f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; "
              f"{'tiny' if args.quick else 'Flux.1 at its real width (3072, 24 heads), 1 double + 2 single blocks'}, "
              f"random weights, {str(dtype).replace('torch.', '')}; host attention `{host_attention_name()}`; batch 1; "
              f"{text} text tokens; image and each reference {size} px ({(size // 16) ** 2} tokens); one reference "
              f"image per person; λ {STRENGTH}; median of {args.repeats} interleaved round(s), "
              f"{'wall' if args.clock == 'wall' else 'CPU'} time.\n")
    document = f"{header}\n{table}\n\n## Timings\n\n{raw_table([size], {size: by})}\n"
    print(table, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document)
    log(f"written {args.out} ({time.monotonic() - start:.0f} s in all)")
    return 0


def weights_key_cost(model, width: int) -> tuple[float, float, float]:
    """(seconds to key a newly loaded model: every tensor hashed, GB hashed, milliseconds of the
    once-per-run walk that finds nothing new) for the MODEL's training-free reference net."""
    from IDFusion.models import fingerprint
    refnet = E.training_free_features(model, E.identity(1, width=width)).refnet
    before = fingerprint.stats()["bytes_hashed"]
    fingerprint.begin_run()
    start = time.perf_counter()
    fingerprint.weights_fingerprint(model.model, refnet)
    cold = time.perf_counter() - start
    hashed = (fingerprint.stats()["bytes_hashed"] - before) / 1e9
    fingerprint.begin_run()
    start = time.perf_counter()
    fingerprint.weights_fingerprint(model.model, refnet)
    return cold, hashed, 1000 * (time.perf_counter() - start)


# --- the table --------------------------------------------------------------------------------------

def _ratio(value: float) -> str:
    return f"{value:.2f}"


def _mib(value: float) -> str:
    return f"{value / 2 ** 20:.0f}"


def results_table(sizes: list[int], refs: list[int], measured: dict, passes: dict, sampling_size: int,
                  encoding: tuple[float, float] | None = None,
                  weights_key: tuple[float, float, float] | None = None, syncs: dict | None = None) -> str:
    head = "| measure | size | " + " | ".join(f"{n} ref{'s' if n > 1 else ''}" for n in refs) + " |"
    lines = [head, "|" + "---|" * (2 + len(refs))]

    def row(key: str, size_label: str, cells: list[str]) -> None:
        lines.append(f"| {ROWS[key]} | {size_label} | " + " | ".join(cells) + " |")

    for size in sizes:
        by = measured[size]
        unpatched = by[("unpatched", None)]
        t0 = unpatched.median
        ratio = lambda key, n: by[(key, n)].median / t0                                  # noqa: E731
        label = f"{size} px"
        row("unpatched", label, [f"{t0:.3f}"] * len(refs))
        if ("consistentid", None) in by:
            row("consistentid", label, [_ratio(ratio("consistentid", None))] * len(refs))
        if ("cold", refs[0]) not in by:
            continue
        for key in ("cold", "cached", "bound"):
            row(key, label, [_ratio(ratio(key, n)) for n in refs])
        row("vs_bound", label, [_ratio(by[("cached", n)].median / by[("bound", n)].median) for n in refs])
        for key in ("doubling", "fused_1", "fused_2", "fused_2_masked"):
            row(key, label, [_ratio(ratio(key, n)) for n in refs])
        peak = lambda key, n: by[(key, n)].peak                                          # noqa: E731
        row("memory", label, [f"{_mib(unpatched.peak)} / {_mib(peak('cold', n))} / {_mib(peak('cached', n))}"
                              for n in refs])
    if passes:
        row("passes", f"{sampling_size} px", [f"{passes[n][0]} / {passes[n][1]}" for n in refs])
    if encoding is not None:
        row("consistentid_encode", "512 px", [f"{encoding[0]:.2f} / {encoding[1]:.3f}"] * len(refs))
    if weights_key is not None:
        cold, hashed, walk = weights_key
        row("weights_key", "–", [f"{cold:.2f} ({hashed / cold:.2f}) / {walk:.1f}"] * len(refs))
    if syncs:
        row("syncs", f"{sizes[0]} px", [str(syncs[n]) for n in refs])
    return "\n".join(lines)


def raw_table(sizes: list[int], measured: dict) -> str:
    lines = ["| case | size | N | median wall s | min–max wall s | median CPU s | min–max CPU s | peak memory growth MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for (key, n), case in measured[size].items():
            wall, cpu = [t.wall for t in case.timings], [t.cpu for t in case.timings]
            lines.append(f"| {key} | {size} px | {n if n is not None else '–'} | {statistics.median(wall):.3f} | "
                         f"{min(wall):.3f}–{max(wall):.3f} | {statistics.median(cpu):.3f} | "
                         f"{min(cpu):.3f}–{max(cpu):.3f} | {_mib(case.peak)} |")
    return "\n".join(lines)


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return ("peak memory growth = `torch.cuda.max_memory_allocated` during the call minus what was allocated "
                "before it (weights, inputs and cached features excluded): the activations and temporaries of one call.")
    return ("peak memory growth = the process RSS (psutil, sampled every 2 ms by a thread) at its highest during the "
            "call minus the RSS just before it, after `malloc_trim`: the memory the call took from the OS for "
            "activations, temporaries and new cache entries (weights excluded). Allocations reused from the heap "
            "do not show, and peaks shorter than the sampling interval can be missed: a coarse figure.")


# --- main -----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else the CPU")
    p.add_argument("--sizes", type=int, nargs="+", help="image sizes in px (default: 512 on the CPU, 512 768 on CUDA)")
    p.add_argument("--refs", type=int, nargs="+", default=[1, 2, 4], help="references per identity (default: 1 2 4)")
    p.add_argument("--repeats", type=int, help="timed rounds, the median is reported (default: 3 on the CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed rounds before them (default: 0 on the CPU, 1 on CUDA; one "
                                              "untimed unpatched call always runs first)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the reference-pass count (default 4)")
    p.add_argument("--sampling-size", type=int,
                   help="image size of the reference-pass count (default: the first size on CUDA, 128 on the CPU; "
                        "the count does not depend on it)")
    p.add_argument("--attention", choices=("pytorch", "host"), default="pytorch",
                   help="the host's attention: pytorch (--use-pytorch-cross-attention, torch's fused kernels, the "
                        "family the reference patch itself uses) or host (ComfyUI's own choice for the device: "
                        "sub-quadratic on the CPU). Default pytorch")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="what the ratios divide: wall time, or the CPU time of the calling thread (all the work when "
                        "torch runs one thread; robust to other processes on a shared machine). auto: cpu on the CPU "
                        "with one torch thread, else wall")
    p.add_argument("--quick", action="store_true", help="tiny UNet, 64 px, one round: a smoke check, not a measurement")
    p.add_argument("--only", choices=("all", "consistentid", "dit"), default="all",
                   help="consistentid: only the unpatched and ConsistentID cases and its encoding; dit: the DiT "
                        "nodes on a Flux.1 of the real width with fewer blocks (needs ComfyUI 0.17.0+; default size "
                        "512 px on the CPU, 1024 on CUDA). Default all (the UNet cases)")
    p.add_argument("--out", type=Path, help="markdown file to write (default: test-artifacts/benchmark-<device>.md)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    cuda = args.device == "cuda"
    if args.sizes is None:
        full = [1024] if args.only == "dit" else [512, 768]
        args.sizes = [64] if args.quick else (full if cuda else [512])
    if any(s % 64 for s in args.sizes):
        p.error(f"--sizes must be multiples of 64 px, got {args.sizes}")
    if any(n < 1 for n in args.refs):
        p.error(f"--refs must be ≥ 1, got {args.refs}")
    if args.clock == "auto":
        args.clock = "cpu" if not cuda and torch.get_num_threads() == 1 else "wall"
    if args.clock == "cpu" and (cuda or torch.get_num_threads() != 1):
        p.error("--clock cpu measures one thread's work: use it on the CPU with one torch thread (OMP_NUM_THREADS=1)")
    if args.repeats is None:
        args.repeats = 1 if args.quick else (10 if cuda else 3)
    if args.warmup is None:
        args.warmup = 1 if cuda and not args.quick else 0
    if args.sampling_size is None:
        args.sampling_size = 64 if args.quick else (args.sizes[0] if cuda else 128)
    args.ref_latent = QUICK_REF_LATENT if args.quick else REF_LATENT
    if args.quick:
        args.steps = min(args.steps, 2)
    if args.out is None:
        kind = "-dit" if args.only == "dit" else ""
        args.out = ARTIFACTS / f"benchmark{kind}-{args.device}{'-quick' if args.quick else ''}.md"
    return args


def host_attention_name() -> str:
    from comfy.ldm.modules import attention
    return attention.optimized_attention.__name__


def device_words(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch thread(s)"


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    boot_host(args.device, args.attention)
    logging.getLogger("IDFusion").setLevel(logging.WARNING)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = time.monotonic()
    if args.only == "dit":
        return dit_main(args, device, torch.bfloat16 if device.type == "cuda" else dtype, start)
    model, width = build_model(args.quick, device, dtype)
    log(f"{'tiny' if args.quick else 'full-size'} SD1.5 UNet built in {time.monotonic() - start:.1f} s on "
        f"{device_words(device)}, host attention {host_attention_name()}")
    weights_key = weights_key_cost(model, width)
    log(f"weights key: {weights_key[1]:.2f} GB hashed in {weights_key[0]:.2f} s, then {weights_key[2]:.1f} ms per run")

    measured, patched = {}, {}
    cid_weights = consistentid_weights(args.quick)
    refs = args.refs if args.only == "all" else []
    for size in args.sizes:
        cases, models = size_cases(model, width, size, refs, args.ref_latent, device, dtype,
                                   consistentid_model(model, cid_weights))
        patched.update(models)
        timed_call(cases[0].run, device)                                             # process warm-up
        measure(cases, args.repeats, args.warmup, device, args.clock, f"{size} px")
        measured[size] = {(c.key, c.refs): c for c in cases}
    passes = {}
    for n in refs:
        passes[n] = sampling_passes(patched[("reference", n)], width, args.sampling_size, args.steps)
        log(f"sampling, N={n}: reference passes {passes[n][0]} then {passes[n][1]}")
    encoding = consistentid_encoding(cid_weights, args.quick)
    log(f"ConsistentID encoding: {encoding[0]:.2f} s, then {encoding[1]:.3f} s from the cache")

    syncs = {}
    if device.type == "cuda":
        for n in args.refs:
            syncs[n] = call_syncs(patched[("reference", n)], width, args.sizes[0], device, dtype)
            log(f"synchronisations in one cached call, N={n}: {syncs[n]}")
    table = results_table(args.sizes, args.refs, measured, passes, args.sampling_size, encoding, weights_key,
                          syncs)
    header = (f"# IDFusion benchmark: {device_words(device)}\n\n"
              f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; "
              f"{'tiny' if args.quick else 'full-size'} random SD1.5 UNet, {str(dtype).replace('torch.', '')}; "
              f"host attention `{host_attention_name()}`; "
              f"batch 2 (cond, uncond); references {args.ref_latent}×{args.ref_latent} latents ({args.ref_latent * 8} px), training-free, "
              f"λ {STRENGTH}; median of {args.repeats} interleaved round(s), {args.warmup} warm-up round(s), "
              f"{'wall' if args.clock == 'wall' else 'CPU'} time; "
              f"reference-pass count: {args.steps} steps of euler at cfg {CFG}, {args.sampling_size} px.\n")
    clock = "wall time" if args.clock == "wall" else "CPU time of the calling thread (torch runs one thread)"
    notes = (f"- Ratios divide the median {clock} of the patched call by that of the unpatched call at batch 2. *cold*: the "
             "feature cache is emptied before each call, so each call runs a reference pass; *cached*: the "
             "features for this timestep are in the cache.\n"
             "- *lower bound*: the unpatched model whose self-attention, on the blocks the patch touches, is one "
             "attention (the host's kernel) over its own keys and the references' pre-projected keys; "
             "no λ blend, no reference pass, no projection of the references.\n"
             "- *batch-doubling reference-only*: the classic approach batches the references, at the image size, "
             "with the main batch; this is only that larger forward (no attention concatenation), a floor for it.\n"
             "- Fused KV: every block's cross-attention, N references per identity; *masked*: two identities in "
             "the left and right halves (routing bias).\n"
             "- ConsistentID: its LoRA as weight patches (the host merges them into the weights when it loads the "
             "MODEL, so the call's work is the plain call's) and 4 ID tokens in every cross-attention, one person, "
             "official strengths. Its encoding (ArcFace, BiSeNet, CLIP-ViT-H of the photo and up to five regions, "
             "FacialEncoder, ID projection; random full-size weights, synthetic buffalo_l) runs once per photo and "
             "is then served by its content cache.\n"
             f"- {memory_note(device)}\n"
             "- *weights key*: what keying the feature cache by the exact weights costs (models/fingerprint.py): "
             "once per newly loaded model every tensor is hashed on its load device (CPU: SHA-256, threads as "
             "torch's; CUDA: exact integer row sums on the device), then each sampling run only walks the tensors "
             "(memoized by identity). Measured on this UNet before any other case.\n")
    document = f"{header}\n{table}\n\n{notes}\n## Timings\n\n{raw_table(args.sizes, measured)}\n"
    print(table, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document)
    log(f"written {args.out} ({time.monotonic() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
