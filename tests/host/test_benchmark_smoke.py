"""tools/benchmark.py --quick runs to the end on the tiny UNet and prints its table.

A smoke check of the script (every case runs, the cold/cached pass counts hold, the table has
its rows): no timing is asserted here.
"""
import os
import subprocess
import sys

from idf_testlib.paths import ROOT

ROW_LABELS = (
    "unpatched forward, batch 2 (s)",
    "ConsistentID: LoRA + ID tokens in every cross-attention (× unpatched)",
    "reference attention, cold (× unpatched)",
    "reference attention, cached (× unpatched)",
    "lower bound: one attention over [self; refs] (× unpatched)",
    "cached / lower bound (target ≤ 1.15)",
    "batch-doubling reference-only, forward at batch 2+N (× unpatched)",
    "fused KV, 1 identity (× unpatched, cached)",
    "fused KV, 2 identities (× unpatched, cached)",
    "fused KV, 2 identities, masked (× unpatched, cached)",
    "peak memory growth, MiB: unpatched / cold / cached",
    "reference passes, sampling run 1 / run 2 (target: run 2 = 0)",
    "ConsistentID encoding of one 512 px photo, s: cold / cached",
)


def test_quick_benchmark_prints_the_table(tmp_path):
    out = tmp_path / "benchmark.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--quick", "--device", "cpu",
                           "--refs", "1", "2", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert lines[0] == "| measure | size | 1 ref | 2 refs |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert tuple(rows) == ROW_LABELS
    for label, line in rows.items():
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), line
    passes = [c.strip() for c in rows[ROW_LABELS[-2]].strip("|").split("|")[2:]]
    assert all(p.endswith("/ 0") for p in passes), passes         # the second run is served by the cache
    assert out.read_text().count("| measure |") == 1


DIT_ROW_LABELS = (
    "no references, batch 1 (s)",
    "native references (× no references)",
    "people at strength 1.5, no masks (× native references)",
    "people routed by region (× native references; target ≤ 1.10)",
    "training-free reference attention, cached (× no references; target ≤ 1.15 for 1 reference)",
    "training-free reference attention, cold (× no references)",
    "reference keys/values per reference image per step, MiB: this model / Flux.1 (57 blocks, bf16)",
)


def test_quick_dit_benchmark_prints_the_table(tmp_path, dit_host):
    """--only dit --quick: every DiT case runs (cold calls one pass per identity, cached none: checked by
    the script), and the table has its rows."""
    out = tmp_path / "benchmark-dit.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--only", "dit", "--quick",
                           "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert lines[0] == "| measure | size | 1 person | 2 people |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert tuple(rows) == DIT_ROW_LABELS
    for line in rows.values():
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), line
    assert "## Timings" in out.read_text()
