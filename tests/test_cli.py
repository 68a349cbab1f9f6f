"""The command line: `info` and `check`."""

from __future__ import annotations

import subprocess
import sys

from crossvit_fast.__main__ import main


def test_info_lists_every_backend_with_a_reason(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "cuda"):
        assert f"  {name}" in out
    assert "torch" in out and "backend='auto'" in out


def test_check_runs_every_available_backend(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "max |d out|" in out
    assert "FAILED" not in out and "too large" not in out


def test_module_entry_point_runs():
    r = subprocess.run(
        [sys.executable, "-m", "crossvit_fast", "info"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    assert "crossvit_fast" in r.stdout


def test_import_does_not_import_triton():
    code = "import sys, crossvit_fast; crossvit_fast.available_backends(); print('triton' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
