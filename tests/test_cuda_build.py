"""CPU-runnable tests of the CUDA C++ backend.

* availability and build messages (CPU-only torch here), setup.py without the extension, the
  JIT build lock (stale lock files, a live holder, torch's stale baton);
* fake kernels (meta tensors) and the functionals' ValueErrors;
* `nvcc` marker: every csrc/*.cu compiled with nvcc for sm_80 and sm_90a;
* the kernels themselves, run by the CPU emulator (csrc/emu: the same source, one host thread
  per CUDA thread) against the reference, with the check helpers of the GPU tier
  (tests/test_cuda_ops.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import crossvit_fast
from crossvit_fast.backends import CrossAttentionParams
from crossvit_fast.ops.cuda import build, kernels
from crossvit_fast.ops.cuda import functional as CF

from . import test_cuda_ops as T
from .conftest import run_python

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CPU_ONLY = torch.version.cuda is None


# -- availability, setup.py, JIT lock -----------------------------------------------------------


@pytest.mark.skipif(not CPU_ONLY, reason="torch has CUDA here")
def test_availability_says_cpu_only_torch():
    ok, why = crossvit_fast.available_backends()["cuda"]
    assert not ok
    assert f"torch {torch.__version__} is a CPU-only build" in why
    ok, why = crossvit_fast.backends.backend_availability("cuda", "cuda")
    assert not ok and "CPU-only build" in why
    with pytest.raises(RuntimeError, match="CPU-only build"):
        crossvit_fast.create_model("crossvit_tiny_240", backend="cuda")


@pytest.mark.skipif(not CPU_ONLY, reason="torch has CUDA here")
def test_extension_load_reports_cpu_only_and_is_cached():
    build._reset_for_tests()
    try:
        with pytest.raises(RuntimeError, match="CPU-only build"):
            build.extension()
        assert "CPU-only" in build._state["error"]
        assert build.status() == (False, build._state["error"])
    finally:
        build._reset_for_tests()


def test_import_does_not_load_or_build_the_extension():
    code = textwrap.dedent("""
        import sys, crossvit_fast
        crossvit_fast.available_backends()
        from crossvit_fast.ops import cuda
        cuda.ops()
        assert "crossvit_fast._C" not in sys.modules
        from crossvit_fast.ops.cuda import build
        assert build._state["module"] is None
        print("ok")
    """)
    out = run_python("-c", code, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.skipif(not CPU_ONLY, reason="torch has CUDA here")
def test_setup_extension_without_cuda_says_why():
    code = "from crossvit_fast.ops.cuda.build import setup_extension; print(setup_extension())"
    out = run_python("-c", code, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("crossvit_fast: building without the CUDA extension (torch ")
    assert "CPU-only build" in lines[0]
    assert lines[-1] == "([], {})"


def test_setup_py_installs_without_torch(tmp_path):
    """An isolated build env has no torch: setup.py still works and says why in one line."""
    shim = tmp_path / "sitecustomize.py"  # make `import torch` fail in the child
    shim.write_text("import sys\nsys.modules['torch'] = None\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    out = run_python("setup.py", "--version", cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "crossvit_fast: building without the CUDA extension (" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == crossvit_fast.__version__


def test_skip_env_knob(monkeypatch, capsys):
    monkeypatch.setenv("CROSSVIT_FAST_SKIP_CUDA_BUILD", "1")
    assert build.setup_extension() == ([], {})
    assert "CROSSVIT_FAST_SKIP_CUDA_BUILD" in capsys.readouterr().out


def test_setup_py_does_not_import_the_package(tmp_path):
    """pip runs setup.py through setuptools.build_meta from a helper script: the source tree is
    not on sys.path and the package (not installed yet) is not importable. setup.py loads its
    build helpers by file path, so it still says why the extension is or is not built."""
    runner = tmp_path / "run_setup.py"
    runner.write_text(
        textwrap.dedent(f"""
        import runpy, sys
        sys.modules["crossvit_fast"] = None  # any `import crossvit_fast...` now fails
        sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        sys.argv = ["setup.py", "--version"]
        runpy.run_path("setup.py", run_name="__main__")
    """)
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = run_python(str(runner), cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "crossvit_fast: building " in out.stdout and "No module named" not in out.stdout
    assert out.stdout.strip().splitlines()[-1] == crossvit_fast.__version__


def _fake_toolkit(home: Path, version: str = "13.0", cudart: bool = True) -> Path:
    """A folder shaped like a CUDA home: bin/nvcc (a script answering --version and --dryrun as
    nvcc does), include/cuda_runtime_api.h, lib64/libcudart.so."""
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "lib64").mkdir()
    (home / "include" / "cuda_runtime_api.h").write_text("")
    if cudart:
        (home / "lib64" / "libcudart.so").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in
          *--version*) echo "Cuda compilation tools, release {version}, V{version}.1" ;;
          *--dryrun*) echo "#$ _HERE_={home / "bin"}" >&2 ;;
        esac
    """)
    )
    nvcc.chmod(0o755)
    return home


def _wrapper(folder: Path, target: Path) -> Path:
    """An `nvcc` outside the CUDA home that execs the real one (as /usr/local/bin/nvcc can)."""
    folder.mkdir(parents=True)
    w = folder / "nvcc"
    w.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    w.chmod(0o755)
    return w


@pytest.fixture
def no_cuda_env(monkeypatch, tmp_path):
    """No CUDA_HOME / CUDA_PATH, an empty PATH and no standard install folders: each test then
    adds exactly the toolkit layout it is about (and reads nothing outside tmp_path)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(build, "_standard_homes", lambda: [tmp_path / "usr-local-cuda"])
    return monkeypatch


def test_toolkit_from_cuda_home(no_cuda_env, tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    no_cuda_env.setenv("CUDA_HOME", str(home))
    tk, why = build.find_cuda_toolkit()
    assert why == "" and (tk.home, tk.version, tk.found_by) == (home, "13.0", "CUDA_HOME")


def test_wrong_cuda_home_is_refused_naming_what_is_missing(no_cuda_env, tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    (home / "include" / "cuda_runtime_api.h").unlink()
    _wrapper(tmp_path / "bin", _fake_toolkit(tmp_path / "other") / "bin" / "nvcc")
    no_cuda_env.setenv("PATH", str(tmp_path / "bin"))
    no_cuda_env.setenv("CUDA_HOME", str(home))  # explicit: not overridden by the nvcc on PATH
    tk, why = build.find_cuda_toolkit()
    assert tk is None
    assert why == (
        f"CUDA_HOME={home} is not a usable CUDA toolkit "
        f"(no {home / 'include' / 'cuda_runtime_api.h'})"
    )


def test_toolkit_behind_an_nvcc_wrapper_script(no_cuda_env, tmp_path):
    """The case torch guesses wrong: nvcc on PATH is a script in <prefix>/bin, the toolkit lives
    elsewhere. The folder above the wrapper has a bin/nvcc but no headers."""
    home = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = _wrapper(tmp_path / "prefix" / "bin", home / "bin" / "nvcc")
    no_cuda_env.setenv("PATH", str(wrapper.parent))
    tk, why = build.find_cuda_toolkit()
    assert why == "" and tk.home == home and tk.nvcc == home / "bin" / "nvcc"
    assert tk.found_by == f"nvcc on PATH ({wrapper})"


def test_toolkit_behind_an_nvcc_symlink(no_cuda_env, tmp_path):
    home = _fake_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    no_cuda_env.setenv("PATH", str(tmp_path / "bin"))
    assert build.find_cuda_toolkit()[0].home == home


def test_toolkit_in_a_standard_folder_without_nvcc_on_path(no_cuda_env, tmp_path):
    home = _fake_toolkit(tmp_path / "usr-local-cuda")
    assert build.find_cuda_toolkit()[0].home == home


def test_no_toolkit_reasons(no_cuda_env, tmp_path):
    assert build.find_cuda_toolkit() == (
        None,
        "nvcc not found (install the CUDA toolkit, or set CUDA_HOME)",
    )
    # a wrapper whose toolkit has no libcudart: no usable home anywhere
    home = _fake_toolkit(tmp_path / "cuda-13.0", cudart=False)
    wrapper = _wrapper(tmp_path / "bin", home / "bin" / "nvcc")
    no_cuda_env.setenv("PATH", str(wrapper.parent))
    tk, why = build.find_cuda_toolkit()
    assert tk is None and why.startswith(f"nvcc is on PATH ({wrapper}) but no CUDA toolkit")
    assert "set CUDA_HOME" in why


def test_toolkit_major_version_must_match_torch(tmp_path):
    tk = build.CudaToolkit(tmp_path, tmp_path / "bin" / "nvcc", "12.8", "CUDA_HOME")
    assert build._version_problem(tk, "12.6") is None  # torch's builder only warns on minors
    assert "nvcc 12.8" in build._version_problem(tk, "13.0")


def test_build_plan_is_what_why_no_build_reports(no_cuda_env, tmp_path):
    """The plan the setup.py and JIT builds follow, with torch's CUDA version pretended: host
    compiler, toolkit, version match; why_no_build gives the same answer."""
    no_cuda_env.setattr(torch.version, "cuda", "13.0")
    no_cuda_env.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert build._build_plan()[1].startswith(f"no C++ compiler ({tmp_path / 'no-such-c++'})")
    no_cuda_env.delenv("CXX")
    _wrapper(tmp_path / "hostbin", Path("/bin/true")).rename(tmp_path / "hostbin" / "c++")
    no_cuda_env.setenv("PATH", str(tmp_path / "hostbin"))  # a c++, no nvcc
    assert (
        build._build_plan()[1]
        == build.why_no_build()
        == "nvcc not found (install the CUDA toolkit, or set CUDA_HOME)"
    )
    no_cuda_env.setenv("CUDA_HOME", str(_fake_toolkit(tmp_path / "cuda12", version="12.8")))
    assert "does not match torch's CUDA 13.0" in build.why_no_build()
    no_cuda_env.setenv("CUDA_HOME", str(_fake_toolkit(tmp_path / "cuda13")))
    assert build.why_no_build() is None
    assert build._build_plan()[0].home == tmp_path / "cuda13"


def test_default_arch_list_embeds_ptx_of_the_newest_arch():
    entries = build.DEFAULT_ARCH_LIST.split(";")
    newest = max(entries, key=lambda e: float(e.removesuffix("+PTX")))
    assert newest.endswith("+PTX") and entries[-1] == newest
    assert build.cuda_archs(build.DEFAULT_ARCH_LIST) == ["sm_80", "sm_90"]
    assert build.cuda_archs("9.0a 10.0+PTX") == ["sm_90a", "sm_100"]
    with pytest.raises(ValueError, match="cannot read 'Hopper'"):
        build.cuda_archs("8.0;Hopper")


def test_jit_build_honours_the_arch_list_without_asking_the_gpu(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_gpu_query():
        raise AssertionError("the GPU was queried although TORCH_CUDA_ARCH_LIST is set")

    seen = {}
    monkeypatch.setattr(build, "_arch_list_of_visible_gpu", no_gpu_query)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(kw) or "module")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # restored after
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("CROSSVIT_FAST_BUILD_DIR", str(tmp_path / "jit"))
    tk = build.CudaToolkit(tmp_path / "cuda", tmp_path / "cuda" / "bin" / "nvcc", "13.0", "test")
    assert build._jit_build(tk) == "module"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    torch_home = cpp_extension.CUDA_HOME  # the home torch's builder uses: ours
    assert torch_home == str(tmp_path / "cuda")
    assert seen["name"] == "crossvit_fast_C"


@pytest.mark.skipif(not CPU_ONLY, reason="torch has CUDA here")
def test_info_reports_the_extension_state(capsys):
    from crossvit_fast.__main__ import main

    assert main(["info"]) == 0
    line = next(
        ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("CUDA extension")
    )
    assert "not built: torch" in line and "CPU-only build" in line


def test_sources_exist_and_are_shipped():
    assert [Path(p).name for p in build.source_paths()] == list(build.SOURCES)
    assert "recursive-include csrc" in (ROOT / "MANIFEST.in").read_text()


def test_lock_with_stale_file_is_acquired_at_once(tmp_path):
    lock = tmp_path / "crossvit_fast.build.lock"
    lock.write_text("12345\n")  # left by a process that was killed mid-build
    t = time.monotonic()
    with build.build_lock(lock, timeout=5):
        assert lock.read_text().strip() == str(os.getpid())
    assert time.monotonic() - t < 2


def test_lock_held_by_a_live_process_times_out_clearly(tmp_path):
    lock = tmp_path / "crossvit_fast.build.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(30)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(build.BuildLockTimeout, match="held by another process"),
            build.build_lock(lock, timeout=0.5),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with build.build_lock(lock, timeout=5):  # the holder died: its lock went with it
        pass


def test_stale_torch_baton_is_removed(tmp_path):
    (tmp_path / "lock").write_text("")
    assert build.remove_stale_torch_baton(tmp_path)
    assert not (tmp_path / "lock").exists()
    assert not build.remove_stale_torch_baton(tmp_path)


def test_first_error_lines_of_a_compiler_log():
    log = (
        "ninja: build stopped\n[1/5] nvcc ...\nfoo.cu(12): error: identifier x is undefined\nmore\n"
    )
    assert build._first_error_lines(log).startswith("foo.cu(12): error: identifier x")


# -- fake kernels and input validation ------------------------------------------------------------


def test_fake_kernels_shapes_on_meta():
    m = dict(device="meta")
    x = torch.empty(2, 5, 64, **m)
    y, s, mean, rstd = kernels.layer_norm(x, x, None, None, 1e-6, True, torch.bfloat16)
    assert (y.shape, y.dtype, s.shape, mean.shape, rstd.dtype) == (
        x.shape,
        torch.bfloat16,
        x.shape,
        (10,),
        torch.float32,
    )
    assert kernels.layer_norm(x, None, None, None, 1e-6, False, torch.float32)[1].shape == (0,)
    assert kernels.bias_gelu(x, None).shape == x.shape
    out = kernels.token_assemble(
        torch.empty(2, 9, 64, **m),
        None,
        torch.empty(64, **m),
        torch.empty(10, 64, **m),
        torch.float32,
    )
    assert out.shape == (2, 10, 64)
    u, lse, mean, rstd = kernels.cross_attention_core(
        x[:, 0], x, None, None, torch.empty(2, 4, 64, **m), 0.25, 1e-6
    )
    assert (u.shape, lse.shape, mean.shape, u.dtype) == ((2, 4, 64), (2, 4), (2, 5), torch.float32)
    dx, dw, _db = kernels.layer_norm_backward(
        x, x, mean.flatten(), mean.flatten(), None, None, False
    )
    assert dx.shape == x.shape and dw.shape == (64,)


def test_functionals_raise_value_errors():
    cls, tok = torch.randn(2, 64), torch.randn(2, 5, 64)
    w = [torch.randn(64, 64) for _ in range(4)]

    def params(wq, wk, wv, wo):
        return CrossAttentionParams(None, None, wq, None, wk, None, wv, None, wo, None)

    with pytest.raises(ValueError, match="divisible by num_heads"):
        CF.cross_attention(cls, tok, params(w[0], w[1], w[2], w[3]), 5, 1e-6)
    with pytest.raises(ValueError, match=r"tokens: expected shape \(2, 1 \+ N, 64\)"):
        CF.cross_attention(cls, tok[:, :, :32], params(w[0], w[1], w[2], w[3]), 4, 1e-6)
    with pytest.raises(ValueError, match=r"cross_attention wk: expected shape \(64, 64\)"):
        CF.cross_attention(cls, tok, params(w[0], w[1][:32], w[2], w[3]), 4, 1e-6)
    with pytest.raises(ValueError, match="expected dtype in"):
        CF.layer_norm(torch.ones(2, 3, dtype=torch.int32), None, None, 1e-6)
    with pytest.raises(ValueError, match=r"layer_norm weight: expected shape \(8\)"):
        CF.layer_norm(torch.ones(2, 8), torch.ones(7), None, 1e-6)
    with pytest.raises(ValueError, match="divisible by the patch size 16"):
        CF.patch_embed(
            torch.ones(1, 3, 20, 32),
            torch.ones(8, 3, 16, 16),
            None,
            torch.ones(1, 1, 8),
            torch.ones(1, 3, 8),
        )
    with pytest.raises(ValueError, match=r"pos_embed: expected shape \(1, 5, 8\)"):
        CF.token_assemble(torch.ones(1, 8, 2, 2), torch.ones(1, 1, 8), torch.ones(1, 4, 8))


# -- nvcc compile check ---------------------------------------------------------------------------

NVCC = shutil.which("nvcc")
ARCHS = ("sm_80", "sm_90a")


def _nvcc_cmd(src: Path, arch: str, out: Path) -> list[str]:
    # -O0 for cicc and ptxas: every front-end, template and PTX-assembly error still shows, in a
    # fraction of the optimising build's time (CI has 2 cores). The flags mirror torch's build.
    return [
        NVCC,
        "-c",
        "-std=c++17",
        f"-arch={arch}",
        "-Xcicc",
        "-O0",
        "-Xptxas",
        "-O0",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
        "-Werror",
        "all-warnings",
        f"-I{CSRC}",
        str(src),
        "-o",
        str(out),
    ]


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_every_cu_compiles_with_nvcc(tmp_path):
    sources = sorted(CSRC.glob("*.cu"))
    assert {s.name for s in sources} >= {
        "layer_norm.cu",
        "bias_gelu.cu",
        "token_assemble.cu",
        "cross_attention.cu",
    }
    jobs = [(s, a) for s in sources for a in ARCHS]

    def compile_one(job):
        src, arch = job
        cmd = _nvcc_cmd(src, arch, tmp_path / f"{src.stem}_{arch}.o")
        return job, subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, jobs))
    failed = [
        f"{s.name} [{a}]:\n{r.stdout}{r.stderr}" for (s, a), r in results if r.returncode != 0
    ]
    assert not failed, "\n\n".join(failed)


# -- the kernels, run by the CPU emulator ----------------------------------------------------------


@pytest.fixture(scope="module")
def emu(cuda_emulator):
    """The CPU emulator build of the CUDA kernels (tests/conftest.py), installed as the backend's
    extension for the tests of this section."""
    with build.use_extension(cuda_emulator):
        yield cuda_emulator


CPU = "cpu"
EMU_DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize(
    "shape,noncontig",
    [((2, 9, 96), False), ((3, 100), False), ((0, 5, 64), False), ((2, 5, 64), True)],
)
def test_emu_layer_norm(emu, dtype, shape, noncontig):
    T.check_layer_norm(CPU, dtype, shape, noncontig)


@pytest.mark.parametrize("C", [1032, 1030])  # > 1024: 64-lane groups; 1030: the scalar path
def test_emu_layer_norm_wide_rows_without_affine(emu, C):
    T.check_layer_norm(CPU, torch.float32, (2, C), affine=False)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_emu_mlp(emu, dtype, bias):
    T.check_mlp(CPU, dtype, 2, 5, 96, 136, bias)  # hidden 136: 8-aligned, not a power of two


def test_emu_mlp_unaligned_hidden(emu):
    T.check_mlp(CPU, torch.float32, 1, 3, 32, 50, True)  # hidden 50: scalar bias-GELU path


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emu_self_attention(emu, dtype):
    T.check_self_attention(CPU, dtype, 2, 9, 96, 3)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_emu_cls_proj(emu, dtype, strided):
    T.check_cls_proj(CPU, dtype, 3, 96, 64, strided)


@pytest.mark.parametrize(
    "dtype,B,N1,C,H,noncontig",
    [
        (torch.float32, 2, 197, 96, 3, False),  # 197 rows: 7 tiles, row splits and their merge
        (torch.bfloat16, 3, 40, 64, 4, False),
        (torch.float16, 2, 9, 48, 3, True),  # strided token rows
        (torch.float32, 1, 1, 32, 2, False),  # N = 0
        (torch.float32, 3, 2, 224, 7, False),  # 7 heads, d = 32, C % 64 != 0
        (torch.float32, 2, 9, 100, 4, False),  # C % 8 != 0: element loads, padded tile
        (torch.float32, 2, 5, 80, 20, False),  # 20 heads: two head groups per sample
        (torch.float32, 0, 4, 64, 4, False),  # empty batch
        (torch.float32, 1, 3, 2056, 8, False),  # C > 4 x 512: a second dx column pass
    ],
)
def test_emu_cross_attention(emu, dtype, B, N1, C, H, noncontig):
    T.check_cross_attention(CPU, dtype, B, N1, C, H, noncontig)


def test_emu_cross_attention_no_qkv_bias(emu):
    T.check_cross_attention(CPU, torch.float32, 2, 11, 64, 4, qkv_bias=False)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emu_cross_fusion(emu, dtype):
    T.check_cross_fusion(CPU, dtype, 2, 17, 48, 96, 3)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize(
    "B,D,h,w,cl",
    [(2, 40, 3, 5, False), (2, 48, 4, 4, True), (0, 16, 2, 2, False), (1, 33, 7, 6, False)],
)
def test_emu_token_assemble(emu, dtype, B, D, h, w, cl):
    T.check_token_assemble(CPU, dtype, B, D, h, w, cl)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_emu_patch_embed(emu, dtype, bias):
    T.check_patch_embed(CPU, dtype, 2, 3, 24, 32, 8, 40, bias)


@pytest.mark.parametrize("op", sorted(T.AUTOCAST_CASES))
def test_emu_autocast_output_dtype(emu, op):
    T.check_autocast(CPU, op)


def test_emu_opcheck_and_compile(emu):
    T.check_fake_and_compile(CPU)


def test_emu_golden_model(emu):
    T.check_golden("plain", CPU)
