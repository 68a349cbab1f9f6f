"""Shared benchmark harness: CUDA-event timing, roofline numbers and committed JSON results.

Every benchmark compares, in one run, the reference eager, the reference under torch.compile and
the fast backend(s); it reports the median time with spread, the ratio to the baseline and the
achieved GB/s or TFLOP/s from an explicit byte / FLOP formula. Results are appended to the file
CROSSVIT_BENCH_RESULTS names (e.g. `benchmarks/results/<device>.json`), when set, with the device
name, torch / triton / CUDA versions and the git commit (see `record`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Dense peaks used for "% of peak" (H100 SXM, per the NVIDIA datasheet, without sparsity).
PEAKS = {
    "H100": {"bf16_tflops": 989.0, "fp16_tflops": 989.0, "tf32_tflops": 494.0, "hbm_gbs": 3350.0},
    "H200": {"bf16_tflops": 989.0, "fp16_tflops": 989.0, "tf32_tflops": 494.0, "hbm_gbs": 4800.0},
}


def device_peaks() -> dict:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return {}


def cuda_time_ms(fn: Callable[[], object], warmup: int = 10, rep: int = 50) -> dict:
    """Median / p20 / p80 milliseconds of `fn` with CUDA events, after `warmup` calls (compile
    and autotune happen there, not in the timing). The L2 cache is not flushed: the token tensors
    of interest are far larger than L2 at batch >= 64."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def cpu_time_ms(fn: Callable[[], object], warmup: int = 2, rep: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"median_ms": times[len(times) // 2], "p20_ms": times[0], "p80_ms": times[-1]}


def time_ms(fn: Callable[[], object], device: str, **kw) -> dict:
    return cuda_time_ms(fn, **kw) if device == "cuda" else cpu_time_ms(fn)


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                check=False,
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def add_speedups(rows: dict) -> None:
    """rows: {(impl, pass): row} from one run, with "reference" and "reference_compiled" among
    the impls. Adds each row's ratio to both baselines of the same pass (same run, same shapes)."""
    for (_, pass_), row in rows.items():
        row["speedup_vs_eager"] = rows[("reference", pass_)]["median_ms"] / row["median_ms"]
        row["speedup_vs_compiled"] = (
            rows[("reference_compiled", pass_)]["median_ms"] / row["median_ms"]
        )


# This pytest session's rows, for the summary table pytest prints at the end without -s
# (benchmarks/conftest.py), and the running benchmark's extra_info (conftest sets it per test).
SESSION_ROWS: list[dict] = []
CURRENT_EXTRA_INFO: dict | None = None


def _pass_name(row: dict) -> str:
    return row.get("pass") or ("fwd+bwd" if row.get("backward") else "fwd")


def record(bench: str, row: dict) -> None:
    """Append one result row (plus the environment) to the file CROSSVIT_BENCH_RESULTS names —
    only when it is set: nothing is written into the source tree unless asked (e.g.
    CROSSVIT_BENCH_RESULTS=benchmarks/results/NVIDIA_H100.json to commit a run; or pytest's
    --benchmark-json / --benchmark-save). Only GPU results are recorded: CPU timings of GPU
    kernels mean nothing. Rows are written one at a time, so a run cut short keeps its rows."""
    SESSION_ROWS.append({"bench": bench, **row})
    if CURRENT_EXTRA_INFO is not None:  # ratios, GB/s, TFLOP/s per (impl, pass)
        key = f"{row.get('impl', '?')}/{_pass_name(row)}"
        CURRENT_EXTRA_INFO[key] = {
            k: v for k, v in row.items() if v is None or isinstance(v, (bool, int, float, str))
        }
    env = environment()
    if env["device"] == "cpu" and not os.environ.get("CROSSVIT_BENCH_RECORD_CPU"):
        return
    if not os.environ.get("CROSSVIT_BENCH_RESULTS"):
        return
    path = Path(os.environ["CROSSVIT_BENCH_RESULTS"])
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append({"bench": bench, **env, **row})
    path.write_text(json.dumps(rows, indent=1) + "\n")
