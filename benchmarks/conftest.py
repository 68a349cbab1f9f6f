"""Benchmarks run on a GPU: `pytest benchmarks/ --benchmark-only` (see README). Without one they
skip, since CPU timings of GPU kernels mean nothing — except those marked `bench_cpu`
(bench_model.py: the reference and timm models are a real comparison on a CPU too).

bench_model.py's options (`--bench-model/-batch/-dtype/-mode/-impl/-rounds`, `--bench-no-ledger`)
and its summary table (printed at the end, without -s) live here too.

`--bench-quick` keeps, per benchmark function (and value of `backward` where it has one), only
the first case at that function's largest batch: every benchmark once at a realistic size, in the
few minutes a lent GPU allows (benchmarks/gpu_session.sh). Most of a case's time is compiling the
reference and autotuning the kernels, not the timed calls, so fewer cases is the lever.
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help="one case per benchmark (and per backward flag), at its largest batch",
    )
    # bench_model.py: comma-separated selections (defaults depend on GPU / CPU, see its docstring)
    for name in ("model", "batch", "impl", "mode"):
        parser.addoption(f"--bench-{name}", default=None, help=f"bench_model.py: {name}(s), a,b")
    parser.addoption("--bench-dtype", default=None, choices=["bf16", "fp16", "fp32"])
    parser.addoption("--bench-rounds", type=int, default=None, help="bench_model.py: timed steps")
    parser.addoption(
        "--bench-no-ledger", action="store_true", help="bench_model.py: skip the cost estimates"
    )


@pytest.fixture(autouse=True)
def _harness_extra_info(request):
    """harness.record puts each row of the running benchmark into its extra_info too."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    import harness

    harness.CURRENT_EXTRA_INFO = request.getfixturevalue("benchmark").extra_info
    yield
    harness.CURRENT_EXTRA_INFO = None


def _op_rows_table(tr) -> None:
    """The op benchmarks' rows (harness.record) as one table."""
    import harness
    from gpu_session_summary import MEASURE_KEYS

    if not harness.SESSION_ROWS:
        return
    tr.section("op benchmarks (ratios measured in this run)")
    skip = MEASURE_KEYS | {
        "vs_compiled",
        "speedup_vs_eager",
        "speedup_vs_compiled",
        "pct_hbm_peak",
        "pct_bf16_peak",
    }
    for r in harness.SESSION_ROWS:
        case = " ".join(f"{k}={v}" for k, v in r.items() if k not in skip)
        rate = (
            f"{r['tflops']:.1f} TFLOP/s"
            if "tflops" in r
            else f"{r.get('gbs', r.get('gb_per_s', 0)):.0f} GB/s"
        )
        eager = r.get("speedup_vs_eager", r.get("vs_reference"))
        comp = r.get("speedup_vs_compiled", r.get("vs_compiled"))
        tr.write_line(
            f"{r.get('op', r['bench']):15s} {harness._pass_name(r):8s} {r.get('impl', '?'):19s} "
            f"{r['median_ms']:9.3f} ms {rate:>15s} x{eager or 0:5.2f} eager "
            f"x{comp or 0:5.2f} compiled  {case}"
        )


def pytest_configure(config):
    config._bench_model_rows, config._bench_model_medians, config._bench_model_ledgers = [], {}, {}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The op benchmarks' rows and bench_model.py's rows as tables (printed without -s)."""
    _op_rows_table(terminalreporter)
    rows = getattr(config, "_bench_model_rows", [])
    if not rows:
        return
    tr = terminalreporter
    tr.section("bench_model: whole model, images/s (ratios measured in this run)")
    head = (
        f"{'model':24s} {'B':>4s} {'dtype':5s} {'mode':5s} {'impl':20s} {'img/s':>9s} "
        f"{'ms':>8s} {'x ref':>6s} {'x cmp':>6s} {'est ms':>7s} {'TFLOP/s':>8s} "
        f"{'GB/s':>7s} {'mem GB':>6s} {'compile s':>9s}"
    )
    tr.write_line(head)
    fmt = lambda v, f: format(v, f) if v is not None else "-"
    for r in rows:
        tr.write_line(
            f"{r['model']:24s} {r['batch']:4d} {r['dtype']:5s} {r['mode']:5s} {r['impl']:20s} "
            f"{r['images_per_s']:9.1f} {r['median_ms']:8.2f} "
            f"{fmt(r.get('ratio_vs_reference'), '6.2f'):>6s} "
            f"{fmt(r.get('ratio_vs_reference_compiled'), '6.2f'):>6s} "
            f"{fmt(r.get('est_ms'), '7.2f'):>7s} {fmt(r.get('tflops'), '8.1f'):>8s} "
            f"{fmt(r.get('gbs'), '7.0f'):>7s} {fmt(r.get('peak_mem_gb'), '6.2f'):>6s} "
            f"{r['compile_s']:9.1f}"
        )
    tr.write_line(
        "(x ref / x cmp: speed-up over reference eager / compiled; est ms, TFLOP/s and "
        "GB/s from the cost ledger's estimates of the same step)"
    )


def _params(item) -> dict:
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


def _batch(item):
    p = _params(item)
    return p.get("batch", p.get("B"))


def quick_selection(items: list) -> tuple[list, list]:
    """(kept, deselected) under --bench-quick (see the module docstring)."""
    largest: dict = {}
    for item in items:
        fn, b = (item.path, item.originalname), _batch(item)
        if b is not None:
            largest[fn] = max(largest.get(fn, b), b)
    kept, dropped, seen = [], [], set()
    for item in items:
        fn = (item.path, item.originalname)
        key = (*fn, _params(item).get("backward"))
        if key in seen or _batch(item) != largest.get(fn):
            dropped.append(item)
        else:
            seen.add(key)
            kept.append(item)
    return kept, dropped


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-quick"):
        kept, dropped = quick_selection(items)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (none visible to torch)")
    for item in items:
        if item.get_closest_marker("bench_cpu") is None:  # bench_model.py also runs on a CPU
            item.add_marker(skip)
