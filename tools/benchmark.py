#!/usr/bin/env python3
"""What IDFusion's patches cost at sampling time, as ratios measured in one run.

    OMP_NUM_THREADS=1 .host/venv/bin/python tools/benchmark.py           # CPU: 512 px, 1/2/4 references
    .host/venv/bin/python tools/benchmark.py --device cuda                # GPU: 512 and 768 px, fp16
    .host/venv/bin/python tools/benchmark.py --quick                      # tiny UNet: a smoke check, seconds

The model is a full-size SD1.5 UNet with random weights, built in memory with ComfyUI's own
classes (fp32 on the CPU, fp16 on CUDA); references are random 28×28 latents (224 px crops)
with a random null context, in training-free mode. Every timing is one ``apply_model`` call
of the real patched MODEL at batch 2 (two guidance branches, ``cond_or_uncond`` [0, 1], as
``calc_cond_batch`` makes it), divided by the same call of the unpatched MODEL. Cases are
interleaved round by round, so a change of machine load reaches all of them alike; each
figure is the median of ``--repeats`` rounds. See docs/benchmark.md for how to read the table.
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

from idf_testlib import engine as E  # noqa: E402
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
    "memory": "peak memory growth, MiB: unpatched / cold / cached",
    "passes": "reference passes, sampling run 1 / run 2 (target: run 2 = 0)",
    "syncs": "host-device synchronisations in one cached call (CUDA; target 1: the timestep)",
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


def size_cases(model, width: int, size: int, refs: list[int], ref_latent: int, device, dtype) -> tuple[list[Case], dict]:
    """Every timed case at one image size, and the patched MODELs by (kind, N)."""
    from IDFusion.models.feature_cache import FEATURE_CACHE
    latent = size // 8
    sigma = float(model.model.model_sampling.percent_to_sigma(0.5))
    timestep = float(model.model.model_sampling.timestep(torch.tensor([sigma])).float()[0])
    main = make_inputs(2, latent, width, sigma, device, dtype)
    base = Case("unpatched", None, lambda: apply_model(model, main))
    cases, patched = [base], {}
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


# --- the table --------------------------------------------------------------------------------------

def _ratio(value: float) -> str:
    return f"{value:.2f}"


def _mib(value: float) -> str:
    return f"{value / 2 ** 20:.0f}"


def results_table(sizes: list[int], refs: list[int], measured: dict, passes: dict, sampling_size: int,
                  syncs: dict | None = None) -> str:
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
        for key in ("cold", "cached", "bound"):
            row(key, label, [_ratio(ratio(key, n)) for n in refs])
        row("vs_bound", label, [_ratio(by[("cached", n)].median / by[("bound", n)].median) for n in refs])
        for key in ("doubling", "fused_1", "fused_2", "fused_2_masked"):
            row(key, label, [_ratio(ratio(key, n)) for n in refs])
        peak = lambda key, n: by[(key, n)].peak                                          # noqa: E731
        row("memory", label, [f"{_mib(unpatched.peak)} / {_mib(peak('cold', n))} / {_mib(peak('cached', n))}"
                              for n in refs])
    row("passes", f"{sampling_size} px", [f"{passes[n][0]} / {passes[n][1]}" for n in refs])
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
    p.add_argument("--out", type=Path, help="markdown file to write (default: test-artifacts/benchmark-<device>.md)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    cuda = args.device == "cuda"
    if args.sizes is None:
        args.sizes = [64] if args.quick else ([512, 768] if cuda else [512])
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
        args.out = ARTIFACTS / f"benchmark-{args.device}{'-quick' if args.quick else ''}.md"
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
    model, width = build_model(args.quick, device, dtype)
    log(f"{'tiny' if args.quick else 'full-size'} SD1.5 UNet built in {time.monotonic() - start:.1f} s on "
        f"{device_words(device)}, host attention {host_attention_name()}")

    measured, patched = {}, {}
    for size in args.sizes:
        cases, models = size_cases(model, width, size, args.refs, args.ref_latent, device, dtype)
        patched.update(models)
        timed_call(cases[0].run, device)                                             # process warm-up
        measure(cases, args.repeats, args.warmup, device, args.clock, f"{size} px")
        measured[size] = {(c.key, c.refs): c for c in cases}
    passes = {}
    for n in args.refs:
        passes[n] = sampling_passes(patched[("reference", n)], width, args.sampling_size, args.steps)
        log(f"sampling, N={n}: reference passes {passes[n][0]} then {passes[n][1]}")

    syncs = {}
    if device.type == "cuda":
        for n in args.refs:
            syncs[n] = call_syncs(patched[("reference", n)], width, args.sizes[0], device, dtype)
            log(f"synchronisations in one cached call, N={n}: {syncs[n]}")
    table = results_table(args.sizes, args.refs, measured, passes, args.sampling_size, syncs)
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
             f"- {memory_note(device)}\n")
    document = f"{header}\n{table}\n\n{notes}\n## Timings\n\n{raw_table(args.sizes, measured)}\n"
    print(table, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document)
    log(f"written {args.out} ({time.monotonic() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
