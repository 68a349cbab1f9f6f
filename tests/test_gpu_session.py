"""benchmarks/gpu_session.sh, the one prepared GPU session, checked without a GPU: its dry run
(stages listed, time-boxed, a failing stage does not stop the next, the summary written, the
table printed last) and the summary's parsers."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STAGES = ["build", "info", "tests", "bench", "model"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _summary_module():
    path = ROOT / "benchmarks" / "gpu_session_summary.py"
    spec = importlib.util.spec_from_file_location("gpu_session_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dry_run(outdir: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "MAX_JOBS": "1", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), str(outdir), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_survives_a_timed_out_one(tmp_path):
    """The tests stage gets 1 s (its collection takes longer): it times out, bench still runs."""
    out = tmp_path / "out"
    r = _dry_run(out, GPU_SESSION_BUDGET_TESTS="1")
    assert r.returncode == 1, r.stdout + r.stderr  # a stage was not ok
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.log",
        "build.log",
        "session.json",
        "summary.md",
        "tests.log",
    ]
    session = json.loads((out / "session.json").read_text())
    assert session["dry_run"] is True
    status = {s["name"]: s["status"] for s in session["stages"]}
    assert list(status) == STAGES
    assert status == {"build": "ok", "info": "ok", "tests": "timeout", "bench": "ok", "model": "ok"}
    assert "why_no_build" in (out / "build.log").read_text()
    assert "CUDA extension" in (out / "build.log").read_text()  # info ran
    assert "tests collected" in (out / "bench.log").read_text()  # the --bench-quick selection
    md = (out / "summary.md").read_text()
    assert all(f"| {name} |" in md for name in STAGES)
    # the short table comes last, then the total time
    tail = r.stdout.strip().splitlines()
    assert tail[-1].startswith("gpu_session: ") and tail[-1].endswith(" s in all")
    assert ["tests", "timeout", "124"] in [ln.split()[:3] for ln in tail[-10:]], r.stdout


def test_dry_run_past_its_deadline_skips_stages_but_writes_the_summary(tmp_path):
    """A deadline that leaves no stage time (the summary keeps its reserve): every stage is
    recorded as no_time and the summary is still written — the 8-minute bound holds however
    slow the stages before were."""
    out = tmp_path / "out"
    r = _dry_run(out, GPU_SESSION_DEADLINE_S="30")
    assert r.returncode == 1, r.stdout + r.stderr
    session = json.loads((out / "session.json").read_text())
    status = {s["name"]: s["status"] for s in session["stages"]}
    assert status == {
        "build": "no_time",
        "info": "no_time",
        "tests": "no_time",
        "bench": "no_time",
        "model": "no_time",
    }
    assert (out / "summary.md").is_file()


def test_usage_errors():
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_pytest_counts():
    s = _summary_module()
    assert s.pytest_counts("...\n=== 3 passed, 1 failed, 2 skipped, 1 error in 9.10s ===\n") == {
        "passed": 3,
        "failed": 1,
        "skipped": 2,
        "error": 1,
    }
    assert s.pytest_counts("13/184 tests collected (171 deselected) in 0.70s") == {
        "deselected": 171,
        "collected": 13,
    }
    assert s.pytest_counts("no summary here") == {}


def test_bench_table_reads_both_row_styles():
    s = _summary_module()
    rows = [
        {
            "op": "cross_fusion",
            "model": "crossvit_9",
            "batch": 256,
            "pass": "fwd+bwd",
            "impl": "triton",
            "median_ms": 1.5,
            "gbs": 900.0,
            "speedup_vs_eager": 4.0,
            "speedup_vs_compiled": 2.0,
            "device": "NVIDIA H200",
            "pct_hbm_peak": 20.0,
        },
        {
            "op": "layer_norm",
            "impl": "cuda",
            "backward": True,
            "C": 128,
            "median_ms": 0.25,
            "gb_per_s": 1200.0,
            "vs_reference": 3.0,
        },
    ]
    assert s.bench_table(rows) == [
        [
            "cross_fusion",
            "model=crossvit_9 batch=256",
            "fwd+bwd",
            "triton",
            "1.500",
            "900 GB/s",
            "4.00",
            "2.00",
        ],
        ["layer_norm", "C=128", "fwd+bwd", "cuda", "0.250", "1200 GB/s", "3.00", ""],
    ]


def test_model_table_puts_measured_beside_estimated(tmp_path):
    s = _summary_module()
    path = tmp_path / "model.json"
    info = {
        "model": "crossvit_18_240",
        "batch": 64,
        "dtype": "bf16",
        "mode": "train",
        "impl": "triton",
        "median_ms": 20.0,
        "est_ms": 15.0,
        "ratio_vs_reference": 1.25,
        "ratio_vs_reference_compiled": None,
        "images_per_s": 3200.0,
    }
    path.write_text(json.dumps({"benchmarks": [{"extra_info": info}]}))
    assert s.model_table(path) == [
        [
            "crossvit_18_240",
            "64",
            "bf16 train",
            "triton",
            "20.00",
            "15.00",
            "0.75",
            "1.25",
            "",
            "3200",
        ]
    ]
    assert s.model_table(tmp_path / "absent.json") == []
