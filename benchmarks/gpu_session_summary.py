"""The last step of benchmarks/gpu_session.sh: session.json and summary.md under OUTDIR, and a
short table on stdout (the end of a device command's output is what comes back first).

    python benchmarks/gpu_session_summary.py OUTDIR STAGES_TSV [--dry-run]

STAGES_TSV: one line per stage written by the shell script: name, status (ok / failed / timeout /
skipped), exit code, seconds, budget, log file name, note. Everything else is read from OUTDIR
(tests.log, bench_rows.json) and from the machine (versions, nvidia-smi, nvcc); every probe is
time-boxed and may fail without failing the summary.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGE_FIELDS = ("name", "status", "rc", "seconds", "budget", "log", "note")
# bench row keys (harness.record) naming what ran and what it measured, not the case: left out of
# the case column here and in benchmarks/conftest.py's end-of-session table
MEASURE_KEYS = {
    "bench",
    "op",
    "impl",
    "pass",
    "backward",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gbs",
    "gb_per_s",
    "tflops",
    "vs_reference",
}
# bench row keys that are not part of the case description: the above and the environment that
# harness.record adds to a results file's rows
_NOT_CASE = MEASURE_KEYS | {"device", "torch", "triton", "cuda", "commit", "date"}


def read_stages(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            parts = line.split("\t") + [""] * len(STAGE_FIELDS)
            rows.append(dict(zip(STAGE_FIELDS, parts[: len(STAGE_FIELDS)])))
    return rows


def pytest_counts(log: str) -> dict:
    """Counts from pytest's last summary line ('3 passed, 1 failed, 2 skipped in 9.1s', or with
    --collect-only '13/184 tests collected (171 deselected)'); {} when there is none."""
    for line in reversed(log.splitlines()):
        found = re.findall(
            r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line
        )
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", line)
        if found or m:
            counts = {k.rstrip("s") if k.startswith("error") else k: int(v) for v, k in found}
            if m:
                counts["collected"] = int(m.group(1))
            return counts
    return {}


def failed_tests(log: str, limit: int = 20) -> list[str]:
    return [ln.strip() for ln in log.splitlines() if ln.startswith(("FAILED ", "ERROR "))][:limit]


def bench_table(rows: list[dict]) -> list[list[str]]:
    """One line per recorded benchmark row: op, case, pass, impl, median, rate, ratios."""
    out = []
    for r in rows:
        pass_ = r.get("pass") or ("fwd+bwd" if r.get("backward") else "fwd")
        case = " ".join(
            f"{k}={v}"
            for k, v in r.items()
            if k not in _NOT_CASE and not k.startswith(("pct_", "speedup_"))
        )
        if "tflops" in r:
            rate = f"{r['tflops']:.1f} TFLOP/s"
        elif "gbs" in r or "gb_per_s" in r:
            rate = f"{r.get('gbs', r.get('gb_per_s')):.0f} GB/s"
        else:
            rate = ""
        eager = r.get("speedup_vs_eager", r.get("vs_reference"))
        comp = r.get("speedup_vs_compiled")
        out.append(
            [
                r.get("op", r.get("bench", "?")),
                case,
                pass_,
                r.get("impl", "?"),
                f"{r['median_ms']:.3f}",
                rate,
                f"{eager:.2f}" if eager else "",
                f"{comp:.2f}" if comp else "",
            ]
        )
    return out


MODEL_HEADER = [
    "model",
    "B",
    "mode",
    "impl",
    "measured ms",
    "est ms",
    "est / measured",
    "x eager",
    "x compiled",
    "img/s",
]


def model_table(path: Path) -> list[list[str]]:
    """bench_model.py's rows (its --benchmark-json): measured vs the cost ledger's estimate."""
    if not path.exists():
        return []
    rows = [b.get("extra_info", {}) for b in json.loads(path.read_text()).get("benchmarks", [])]
    f = lambda v, spec: format(v, spec) if v is not None else ""
    return [
        [
            r["model"],
            str(r["batch"]),
            f"{r['dtype']} {r['mode']}",
            r["impl"],
            f(r["median_ms"], ".2f"),
            f(r.get("est_ms"), ".2f"),
            f(r["est_ms"] / r["median_ms"] if r.get("est_ms") else None, ".2f"),
            f(r.get("ratio_vs_reference"), ".2f"),
            f(r.get("ratio_vs_reference_compiled"), ".2f"),
            f(r["images_per_s"], ".0f"),
        ]
        for r in rows
        if "impl" in r
    ]


def _probe(cmd: list[str], timeout: float = 30) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment() -> dict:
    env: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0]}
    try:
        import torch

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(
                device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count
            )
    except Exception as exc:  # report, never fail the summary
        env["torch"] = f"not importable: {exc}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env["nvidia_smi"] = _probe(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    nvcc = _probe(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-2] if nvcc else None
    env["commit"] = _probe(["git", "rev-parse", "--short", "HEAD"])
    return env


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def main(argv: list[str]) -> int:
    outdir, stages_path = Path(argv[0]), Path(argv[1])
    dry_run = "--dry-run" in argv[2:]
    stages = read_stages(stages_path)
    tests_log = (
        (outdir / "tests.log").read_text(errors="replace")
        if (outdir / "tests.log").exists()
        else ""
    )
    rows_path = outdir / "bench_rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    env = environment()
    counts = pytest_counts(tests_log)
    session = {
        "dry_run": dry_run,
        "environment": env,
        "stages": stages,
        "tests": counts,
        "failed_tests": failed_tests(tests_log),
        "bench_rows": len(rows),
    }
    (outdir / "session.json").write_text(json.dumps(session, indent=1) + "\n")

    stage_rows = [
        [s["name"], s["status"], s["rc"], s["seconds"], s["budget"], s["log"], s["note"]]
        for s in stages
    ]
    stage_header = ["stage", "status", "rc", "s", "budget", "log", "note"]
    bench_header = ["op", "case", "pass", "impl", "median ms", "rate", "x eager", "x compiled"]
    brows = bench_table(rows)
    title = "GPU session" + (" (dry run: plumbing only, nothing measured)" if dry_run else "")
    md = [
        f"# {title}",
        "",
        f"{env.get('device', 'no GPU')} · torch {env.get('torch')} (CUDA {env.get('torch_cuda')}) · "
        f"triton {env.get('triton')} · {env.get('nvcc') or 'no nvcc'} · commit {env.get('commit')} · "
        f"{env['date']}",
        "",
        "## Stages",
        "",
        _md_table(stage_header, stage_rows),
        "",
        "## GPU tests (`pytest -m gpu tests`)",
        "",
        ", ".join(f"{v} {k}" for k, v in counts.items()) or "no pytest summary in tests.log",
    ]
    md += [f"- `{t}`" for t in session["failed_tests"]]
    md += ["", "## Op benchmarks (`--bench-quick`)", ""]
    md.append(_md_table(bench_header, brows) if brows else "no benchmark rows recorded")
    mrows = model_table(outdir / "model.json")
    md += ["", "## Whole model (`bench_model.py`): measured vs the cost ledger's estimate", ""]
    md.append(_md_table(MODEL_HEADER, mrows) if mrows else "no bench_model rows recorded")
    (outdir / "summary.md").write_text("\n".join(md) + "\n")

    print(
        f"\n{title}: {env.get('device', 'no GPU')}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}; files in {outdir}"
    )
    print(_text_table(stage_header[:5], [r[:5] for r in stage_rows]))
    print("tests: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary"))
    if brows:  # short: the op, impl and ratios of each row
        print(
            _text_table(
                ["op", "pass", "impl", "ms", "x eager", "x compiled"],
                [[r[0], r[2], r[3], r[4], r[6], r[7]] for r in brows[:24]],
            )
        )
    if mrows:
        print(_text_table(MODEL_HEADER, mrows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
