"""CPU smoke of benchmarks/bench_model.py: one tiny case end to end, in seconds.

Runs the benchmark file in its own pytest process (benchmarks/ has its own conftest: options,
the summary table) on a tiny config (JSON), batch 2, reference and triton rows (triton skips
with its reason without a GPU), the cost ledger included, and checks the summary
table pytest prints without -s, the extra_info in --benchmark-json, and that the plot command
reads that file (the chart itself needs matplotlib: not required here).
"""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from .conftest import TINY_KWARGS, run_python

ROOT = Path(__file__).resolve().parents[1]


def test_bench_model_cpu_smoke(tmp_path):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "bench.json"
    cfg = tmp_path / "tiny.json"  # 2 + 4 tokens per branch: a step takes milliseconds
    cfg.write_text(json.dumps(TINY_KWARGS))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = run_python(
        "-m",
        "pytest",
        "benchmarks/bench_model.py",
        "--benchmark-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "--bench-model",
        str(cfg),
        "--bench-batch",
        "2",
        "--bench-dtype",
        "fp32",
        "--bench-rounds",
        "2",
        "--bench-impl",
        "reference,triton",
        f"--benchmark-json={out}",
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "bench_model: whole model" in text, text[-3000:]  # the summary, without -s
    if "cuda" not in text.lower():  # no GPU: the fast backend's rows skip with the reason
        assert "SKIPPED" in text and "emulator" in text, text[-3000:]
    rows = [b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]]
    assert {r["mode"] for r in rows} == {"train", "infer"}
    for r in rows:
        assert r["impl"] == "reference" and r["ratio_vs_reference"] == pytest.approx(1.0)
        assert r["images_per_s"] > 0 and r["compile_s"] >= 0
        assert r["est_ms"] > 0 and r["tflops"] > 0  # from the cost ledger of the same step

    from crossvit_fast import plot

    groups, table = plot.speedups(json.loads(out.read_text()))
    assert len(groups) == 2 and table["reference"] == [pytest.approx(1.0)] * 2
    if plot_ok := _has_matplotlib():
        assert plot.main(Namespace(results=str(out), out=str(tmp_path / "s.png"))) == 0
        assert (tmp_path / "s.png").stat().st_size > 0
    assert plot_ok in (True, False)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _load(name: str, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # conftest imports `harness` by name
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_op_rows_reach_extra_info_and_the_summary_table(monkeypatch):
    """harness.record (every op benchmark's row): into the running benchmark's extra_info and
    the end-of-session table; nothing written without CROSSVIT_BENCH_RESULTS."""
    harness = _load("harness", monkeypatch)
    monkeypatch.setitem(sys.modules, "harness", harness)
    monkeypatch.delenv("CROSSVIT_BENCH_RESULTS", raising=False)
    harness.CURRENT_EXTRA_INFO = extra = {}
    row = {
        "op": "mlp",
        "impl": "triton",
        "pass": "fwd+bwd",
        "model": "crossvit_18",
        "batch": 256,
        "median_ms": 2.0,
        "tflops": 300.0,
        "speedup_vs_eager": 1.5,
        "speedup_vs_compiled": 1.1,
    }
    harness.record("mlp", row)
    assert extra["triton/fwd+bwd"]["speedup_vs_compiled"] == 1.1
    assert harness.SESSION_ROWS[-1]["bench"] == "mlp"

    lines = []

    class _Reporter:
        def section(self, title):
            lines.append(title)

        def write_line(self, line):
            lines.append(line)

    _load("conftest", monkeypatch)._op_rows_table(_Reporter())
    assert lines[0].startswith("op benchmarks")
    assert "300.0 TFLOP/s" in lines[1] and "x 1.50 eager" in lines[1] and "batch=256" in lines[1]
