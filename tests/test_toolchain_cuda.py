"""Toolchain tier, CUDA C++ half (`pytest -m toolchain`): what a machine with a CUDA-enabled torch
and nvcc, but no GPU, can prove about csrc/.

* the documented install command (`pip install --no-build-isolation .`, here with `--no-deps
  --target` so that the environment is left as it was) builds `crossvit_fast._C` in one pass, the
  module imports (no driver is needed for that) and `info` reports it;
* ptxas's resource report of every kernel of every .cu, for each arch the build ships
  (TORCH_CUDA_ARCH_LIST, else the package default): zero spills and no local memory, with the
  registers and shared memory of each kernel printed (`-rP` shows the table).

Both skip, naming what is missing, without a CUDA-enabled torch or a CUDA toolkit. CI runs this
tier in a second virtualenv with TORCH_CUDA_ARCH_LIST=9.0 (one arch: the full build is ~4 minutes
of 2 cores); each .cu is compiled once per arch by the ptxas test, device code only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crossvit_fast.ops.cuda import build

from .conftest import run_python

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


@pytest.fixture(scope="module")
def toolkit():
    """The toolkit the package's own build would use; skips with its reason when there is none.
    CUDA_HOME names it while these tests run, as in the build (torch's import-time guess is what
    the package corrects)."""
    found, reason = build._build_plan()
    if found is None:
        pytest.skip(f"no CUDA build possible here: {reason}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_HOME", str(found.home))
        yield found


def _jobs() -> str:
    return os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)


@pytest.mark.toolchain
def test_documented_install_builds_and_imports_the_extension(toolkit, tmp_path):
    target = tmp_path / "site"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=build.arch_list(), MAX_JOBS=_jobs())
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-build-isolation",
        "--no-deps",
        "--no-input",
        "-v",
        "--target",
        str(target),
        str(ROOT),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "crossvit_fast: building the CUDA extension for" in log, log[-6000:]
    assert list(target.glob("crossvit_fast/_C*.so")), f"no _C module in {target}"

    # A fresh process that sees only the installed copy (cwd is not the checkout).
    env = dict(os.environ, PYTHONPATH=str(target))
    code = "import crossvit_fast._C as m; print(m.__file__)"
    r = run_python("-c", code, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(target)
    r = run_python("-m", "crossvit_fast", "info", env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"built, loads: {target}" in r.stdout, r.stdout


# -- ptxas resource report -----------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text: str) -> list[dict]:
    """ptxas -v's report, one dict per kernel: name, arch, registers, smem, stack, spill bytes."""
    kernels: list[dict] = []
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            kernels.append(dict(name=m.group(1), arch=m.group(2)))
        elif kernels and (m := _FRAME.search(line)):
            kernels[-1].update(
                stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3))
            )
        elif kernels and (m := _USED.search(line)):
            kernels[-1].update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    return kernels


def test_parse_ptxas_report():  # no toolchain needed: runs in every tier
    text = (
        "ptxas info    : Compiling entry function '_ZN3cvf1kEv' for 'sm_90'\n"
        "ptxas info    : Function properties for _ZN3cvf1kEv\n"
        "    32 bytes stack frame, 128 bytes spill stores, 56 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers, 1024 bytes smem\n"
    )
    assert parse_ptxas(text) == [
        dict(
            name="_ZN3cvf1kEv",
            arch="sm_90",
            stack=32,
            spill_st=128,
            spill_ld=56,
            regs=64,
            smem=1024,
        )
    ]


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, out.stdout.splitlines())) if out.returncode == 0 else {}


def _ptxas_cmd(toolkit: build.CudaToolkit, src: Path, arch: str, out: Path) -> list[str]:
    # Device code only (-cubin: no host pass), with the shipped build's optimisation flags and
    # torch's half/bfloat16 defines, so the report is that of the kernels the wheel carries.
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return [
        str(toolkit.nvcc),
        "-cubin",
        "-std=c++17",
        f"-arch={arch}",
        *COMMON_NVCC_FLAGS,
        *build._nvcc_flags(),
        "-Xptxas",
        "-v",
        f"-I{CSRC}",
        str(src),
        "-o",
        str(out),
    ]


@pytest.mark.toolchain
def test_every_kernel_has_no_spills_for_the_shipped_archs(toolkit, tmp_path):
    archs = build.cuda_archs(build.arch_list())
    sources = sorted(CSRC.glob("*.cu"))
    jobs = [(s, a) for s in sources for a in archs]

    def compile_one(job):
        src, arch = job
        cmd = _ptxas_cmd(toolkit, src, arch, tmp_path / f"{src.stem}_{arch}.cubin")
        return job, subprocess.run(cmd, capture_output=True, text=True, timeout=1200)

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), int(_jobs())))) as pool:
        results = list(pool.map(compile_one, jobs))
    failed = [f"{s.name} [{a}]:\n{r.stderr}" for (s, a), r in results if r.returncode != 0]
    assert not failed, "\n\n".join(failed)

    rows = [(s.name, k) for (s, _), r in results for k in parse_ptxas(r.stdout + r.stderr)]
    for src in sources:
        assert any(f == src.name for f, _ in rows), f"ptxas reported no kernel of {src.name}"
    names = _demangle(sorted({k["name"] for _, k in rows}))
    print(
        f"\n{'file':20s} {'arch':7s} {'regs':>4s} {'smem':>6s} {'stack':>5s} {'spill st/ld':>11s}  kernel"
    )
    for f, k in rows:
        print(
            f"{f:20s} {k['arch']:7s} {k['regs']:4d} {k['smem']:6d} {k['stack']:5d} "
            f"{k['spill_st']:5d}/{k['spill_ld']:<5d}  {names.get(k['name'], k['name'])}"
        )
    bad = [(f, k) for f, k in rows if k["spill_st"] or k["spill_ld"] or k["stack"]]
    assert not bad, "spills or local memory (stack frame) in: " + "; ".join(
        f"{f} {names.get(k['name'], k['name'])} [{k['arch']}]: {k['stack']} B stack, "
        f"{k['spill_st']} B spill stores, {k['spill_ld']} B spill loads"
        for f, k in bad
    )
