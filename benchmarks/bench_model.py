"""The whole model: one training step (forward, cross-entropy, backward, AdamW step) and one
inference forward, images/s per implementation, with ratios to the reference measured in the same
run.

    pytest benchmarks/bench_model.py --benchmark-only                    # the defaults below
    pytest benchmarks/bench_model.py --benchmark-only --bench-model crossvit_18_240 \\
        --bench-batch 64,256 --bench-dtype bf16 --bench-impl reference,reference_compiled,triton

(--bench-model also takes a CrossViTConfig .json; --bench-mode train|infer; --bench-rounds N
sets the timed steps.)

Implementations (rows): `timm` (timm's CrossVit, when timm is importable), `reference` (this
package, pure PyTorch, eager), `reference_compiled` (the same under torch.compile), each fast
backend eager (`triton`, `cuda`) and compiled (`triton_compiled`, `cuda_compiled`), and `auto`.
A row whose backend cannot run here skips with the reason.

Defaults. On a GPU: crossvit_9_240, crossvit_18_240, crossvit_18_dagger_240 at B = 1, 64, 256,
bf16 autocast, every row. On a CPU: crossvit_tiny_240 at B = 2, reference and timm rows (a real
comparison in a few minutes; fast backends need a GPU).

Timing. On a GPU, CUDA events around each step after warm-up (the first calls compile and
autotune: that time is reported separately as `compile_s`, never in the timing); on a CPU,
perf_counter. Each row's extra_info holds images/s, the median / p20 / p80 ms, the ratios to
`reference` and `reference_compiled` of the same (model, batch, dtype, mode) — measured in this
run, on demand when those rows are not selected — peak memory (GPU), and GB/s and TFLOP/s from
the cost ledger's bytes and FLOPs of the same step (`crossvit_fast.cost`, estimates) next to its
estimated time (`--bench-no-ledger`: without). The compiled baseline is measured only when its
row is selected (it is by default on a GPU). A summary table is printed at the end without `-s` (benchmarks/conftest.py).
Nothing is written into the source tree unless asked (`--benchmark-save`, `--benchmark-json`).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import harness
import pytest
import torch
import torch.nn.functional as F

import crossvit_fast
from crossvit_fast import backends

pytestmark = pytest.mark.bench_cpu  # runs on a CPU too (benchmarks/conftest.py)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
FAST = tuple(b for b in backends.BACKENDS if b != "reference")
IMPLS = (
    "timm",
    "reference",
    "reference_compiled",
    *(f"{b}{s}" for b in FAST for s in ("", "_compiled")),
    "auto",
)
DEFAULTS = {
    True: {
        "model": "crossvit_9_240,crossvit_18_240,crossvit_18_dagger_240",
        "batch": "1,64,256",
        "impl": ",".join(IMPLS),
    },
    False: {"model": "crossvit_tiny_240", "batch": "2", "impl": "timm,reference"},
}
BASELINES = ("reference", "reference_compiled")


def pytest_generate_tests(metafunc):
    if "impl" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    pick = lambda name: (opt(f"--bench-{name}") or DEFAULTS[GPU][name]).split(",")
    dtype = opt("--bench-dtype") or "bf16"
    cases = [
        pytest.param(m, int(b), dtype, mode, impl, id=f"{m}-b{b}-{dtype}-{mode}-{impl}")
        for m in pick("model")
        for b in pick("batch")
        for mode in (opt("--bench-mode") or "train,infer").split(",")
        for impl in pick("impl")
    ]
    metafunc.parametrize("model_name,batch,dtype,mode,impl", cases)


def _skip_reason(impl: str) -> str | None:
    if impl == "timm":
        try:
            import timm  # noqa: F401
        except ImportError:
            return "timm is not installed (pip install timm)"
        return None
    backend = impl.removesuffix("_compiled")
    if backend == "auto":
        return None
    ok, why = backends.backend_availability(backend, DEVICE)
    if backend != "reference" and not GPU:
        return f"{backend} on a CPU runs in an emulator (a test tool, not a speed path): {why}"
    return None if ok else why


def _config(model_name: str):
    if model_name.endswith(".json"):  # a CrossViTConfig as JSON (e.g. the CPU smoke's tiny one)
        return crossvit_fast.CrossViTConfig(**json.loads(Path(model_name).read_text()))
    return crossvit_fast.registry.model_config(model_name)


def _build(model_name: str, impl: str) -> torch.nn.Module:
    if impl == "timm":
        import timm

        if model_name.endswith(".json"):
            pytest.skip("timm builds registered variants only, not a config file")
        return timm.create_model(model_name, pretrained=False)
    backend = impl.removesuffix("_compiled")
    return crossvit_fast.CrossViT(_config(model_name), backend=backend)


class Case:
    """One (model, batch, dtype, mode, impl): the step function and its inputs on the device."""

    def __init__(self, model_name, batch, dtype, mode, impl):
        torch.manual_seed(0)
        self.model = _build(model_name, impl).to(DEVICE).train(mode == "train")
        self.amp = DTYPES[dtype]
        self.mode = mode
        side = max(s if isinstance(s, int) else max(s) for s in _img_sizes(model_name))
        self.x = torch.randn(batch, 3, side, side, device=DEVICE)
        classes = getattr(self.model, "num_classes", 1000)
        self.y = torch.randint(0, max(classes, 1), (batch,), device=DEVICE)
        self.fn = torch.compile(self.model) if impl.endswith("_compiled") else self.model
        if mode == "train":
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(DEVICE, self.amp)

    def step(self) -> None:
        if self.mode == "infer":
            with torch.no_grad(), self.autocast():
                self.fn(self.x)
            return
        with self.autocast():
            loss = F.cross_entropy(self.fn(self.x).float(), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _img_sizes(model_name: str):
    return _config(model_name).img_size


def _sync():
    if GPU:
        torch.cuda.synchronize()


def measure(case: Case, warmup: int, rounds: int) -> dict:
    """compile_s (first call minus a steady one), then `rounds` timed steps (CUDA events on a
    GPU), median / p20 / p80 ms and peak memory."""
    _sync()
    t0 = time.perf_counter()
    case.step()  # compiles / autotunes
    _sync()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        case.step()
    _sync()
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    timing = harness.time_ms(case.step, DEVICE, warmup=0, rep=rounds) if GPU else None
    if timing is None:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            case.step()
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
        timing = {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}
    timing["compile_s"] = max(first - timing["median_ms"] / 1e3, 0.0)
    timing["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9 if GPU else None
    return timing


def _ledger(config, model_name, batch, dtype, mode, impl):
    """Estimated bytes / FLOPs / ms of the same step (the cost ledger, cached per session)."""
    if config.getoption("--bench-no-ledger"):
        return None
    cache = config._bench_model_ledgers
    backend = impl.removesuffix("_compiled")
    if backend == "timm":  # timm's CrossVit runs the reference's aten ops
        backend = "reference"
    elif backend == "auto":  # what auto resolves to here
        backend = "triton" if GPU else "reference"
    key = (model_name, batch, dtype, mode, backend)
    if key not in cache:
        from crossvit_fast import cost

        amp = {"bf16": "bf16", "fp16": "fp16", "fp32": "off"}[dtype]
        cache[key] = cost.ledger(model_name, batch, amp, backend, inference=mode == "infer")[
            "totals"
        ]
    return cache[key]


def _selected_impls(config) -> list[str]:
    return (config.getoption("--bench-impl") or DEFAULTS[GPU]["impl"]).split(",")


def _baselines(config, key, warmup, rounds) -> dict:
    """Median ms of `reference` and `reference_compiled` for this (model, batch, dtype, mode),
    from this run: measured here if their own rows have not run (yet). A baseline not among
    the selected rows is left out (on a CPU, compiling a training step takes minutes)."""
    store = config._bench_model_medians
    for base in BASELINES:
        wanted = base in _selected_impls(config) or base == "reference"
        if (*key, base) not in store and wanted and _skip_reason(base) is None:
            store[(*key, base)] = measure(Case(*key, base), warmup, rounds)["median_ms"]
    return {b: store.get((*key, b)) for b in BASELINES}


def test_model_step(benchmark, request, model_name, batch, dtype, mode, impl):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    config = request.config
    warmup, rounds = (3, 20) if GPU else (1, 3)
    rounds = config.getoption("--bench-rounds") or rounds
    case = Case(model_name, batch, dtype, mode, impl)
    timing = measure(case, warmup, rounds)
    key = (model_name, batch, dtype, mode)
    config._bench_model_medians[(*key, impl)] = timing["median_ms"]
    base = _baselines(config, key, warmup, rounds)
    info = {
        "impl": impl,
        "model": model_name,
        "batch": batch,
        "dtype": dtype,
        "mode": mode,
        "device": harness.environment()["device"],
        **timing,
        "images_per_s": batch / (timing["median_ms"] / 1e3),
    }
    for b, ms in base.items():
        info[f"ratio_vs_{b}"] = ms / timing["median_ms"] if ms else None
    est = _ledger(config, model_name, batch, dtype, mode, impl)
    if est:
        s = timing["median_ms"] / 1e3
        info.update(
            est_ms=est["est_ms"],
            est_launches=est["launches"],
            gbs=est["dram_bytes"] / s / 1e9,
            tflops=est["flops"] / s / 1e12,
        )
    benchmark.extra_info.update(info)
    config._bench_model_rows.append(info)
    # pytest-benchmark's own statistics: a few more steps (synchronised), no warm-up needed.
    benchmark.pedantic(lambda: (case.step(), _sync()), rounds=min(rounds, 5), iterations=1)
