"""Building and loading the CUDA extension (`crossvit_fast._C`).

Three ways the kernels in csrc/ reach Python:

* prebuilt: `setup.py` calls `setup_extension()`, which returns a `CUDAExtension` when torch has
  CUDA and a CUDA toolkit is found (`pip install --no-build-isolation [-e] .` on a machine with
  nvcc; no GPU needed), built for TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": sm_80 and sm_90
  machine code plus sm_90 PTX that newer GPUs' drivers compile), MAX_JOBS honoured by torch's
  ninja build. Otherwise the package installs pure-Python and `setup_extension` says why in one
  line. setup.py loads this file by path (the package is not importable while it is being
  built), so this module imports only the standard library at import time and nothing of
  `crossvit_fast`.
* JIT: without a prebuilt module, `extension()` compiles the sources with
  `torch.utils.cpp_extension.load` on first use (into CROSSVIT_FAST_BUILD_DIR, default
  ~/.cache/crossvit_fast/<torch version>-<cuda version>), under an exclusive `flock` on a lock
  file. The kernel drops an flock when its holder dies, so a killed build leaves no lock behind;
  waiting is bounded (CROSSVIT_FAST_BUILD_TIMEOUT seconds, default 1800) and ends in a clear
  error. Under that lock the stale baton file of torch's own builder (`<build dir>/lock`, left by a
  killed `load`, which would make torch wait forever) is removed first. It compiles for
  TORCH_CUDA_ARCH_LIST when set, else for the visible GPU only.
* tests: `use_extension(module)` installs another module (the CPU emulator of csrc/emu).

The CUDA toolkit (`find_cuda_toolkit`) is looked up once, the same way for `why_no_build`, the
setup.py build and the JIT build, and handed to torch's builder (`_use_toolkit`): torch's own
guess takes the folder above the first `nvcc` on PATH, which is wrong when that `nvcc` is a
wrapper script (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc).

Nothing here runs at `import crossvit_fast`; `extension()` is first called by the backend's
`availability("cuda")` or by the first op. Its outcome (module or the reason it is unavailable)
is kept for the life of the process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2]  # .../crossvit_fast
# sm_80 (A100) and sm_90 (H100/H200) machine code, plus sm_90 PTX: a newer GPU's driver compiles the
# PTX at load (forward compatibility), where machine code alone would not load at all.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
SOURCES = (
    "layer_norm.cu",
    "bias_gelu.cu",
    "token_assemble.cu",
    "cross_attention.cu",
    "bindings.cpp",
)

_state: dict = {"module": None, "error": None}


def csrc_dir() -> Path | None:
    """The kernel sources: `csrc/` beside the package (source checkout, editable install) or
    `crossvit_fast/_csrc` (copied into wheels by setup.py for the JIT path)."""
    for d in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "_csrc"):
        if (d / "kernels.h").is_file():
            return d
    return None


def source_paths(root: Path | None = None) -> list[str]:
    root = root if root is not None else csrc_dir()
    if root is None:
        raise FileNotFoundError("crossvit_fast: the CUDA sources (csrc/) are not installed")
    return [str(root / s) for s in SOURCES]


def _nvcc_flags() -> list[str]:
    # No --use_fast_math: expf / erff / rsqrtf keep fp32 parity with PyTorch's kernels.
    return ["-O3", "-lineinfo"]


# -- the CUDA toolkit -------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaToolkit:
    """A CUDA home that can build the extension: `home/bin/nvcc`, `home/include/*.h`, libcudart."""

    home: Path
    nvcc: Path
    version: str  # "13.0", from `nvcc --version`
    found_by: str  # how it was found, for messages: "CUDA_HOME", "nvcc on PATH", ...


def _toolkit_problem(home: Path) -> str | None:
    """None when `home` holds what torch's builder uses (nvcc, the runtime headers, libcudart),
    else what is missing there."""
    nvcc = home / "bin" / "nvcc"
    if not (nvcc.is_file() and os.access(nvcc, os.X_OK)):
        return f"no executable {nvcc}"
    if not (home / "include" / "cuda_runtime_api.h").is_file():
        return f"no {home / 'include' / 'cuda_runtime_api.h'}"
    libs = [home / d for d in ("lib64", "lib")]  # the folders torch's CUDAExtension links from
    if not any(next(d.glob("libcudart.so*"), None) for d in libs if d.is_dir()):
        return f"no libcudart.so in {libs[0]} or {libs[1]}"
    return None


def _nvcc_version(nvcc: Path) -> str | None:
    """'13.0' from `nvcc --version` (the check torch's builder makes), None if it does not run."""
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out.stdout)
    return m.group(1) if m else None


def _home_behind_nvcc(nvcc: str) -> Path | None:
    """The CUDA home of the compiler that the `nvcc` on PATH really runs: symlinks resolved, and
    for a wrapper script nvcc's own report of its folder (`_HERE_` in a `--dryrun`)."""
    real = Path(os.path.realpath(nvcc))
    if _toolkit_problem(real.parent.parent) is None:
        return real.parent.parent
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return Path(m.group(1).strip()).parent if m else None


def _standard_homes() -> list[Path]:
    """/usr/local/cuda, then /usr/local/cuda-X.Y newest first (where CUDA's installers put it)."""
    versioned = sorted(
        Path("/usr/local").glob("cuda-*"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)],
        reverse=True,
    )
    return [Path("/usr/local/cuda"), *versioned]


def find_cuda_toolkit() -> tuple[CudaToolkit | None, str]:
    """(toolkit, "") or (None, the reason naming what is missing).

    Order: CUDA_HOME / CUDA_PATH when set (and then only it: an explicit setting that is wrong is
    refused, not overridden); else the toolkit behind the `nvcc` on PATH; else the standard
    install folders. No GPU is needed.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            home = Path(os.environ[var])
            problem = _toolkit_problem(home)
            if problem is not None:
                return None, f"{var}={home} is not a usable CUDA toolkit ({problem})"
            return _checked(home, var)
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = _home_behind_nvcc(nvcc)
        if home is not None and _toolkit_problem(home) is None:
            return _checked(home, f"nvcc on PATH ({nvcc})")
    for home in _standard_homes():
        if _toolkit_problem(home) is None:
            return _checked(home, "standard location")
    if nvcc is not None:
        return None, (
            f"nvcc is on PATH ({nvcc}) but no CUDA toolkit was found behind it or in "
            "/usr/local/cuda*: set CUDA_HOME to the folder holding bin/nvcc, include/ and lib64/"
        )
    return None, "nvcc not found (install the CUDA toolkit, or set CUDA_HOME)"


def _checked(home: Path, found_by: str) -> tuple[CudaToolkit | None, str]:
    nvcc = home / "bin" / "nvcc"
    version = _nvcc_version(nvcc)
    if version is None:
        return None, f"{nvcc} (found by {found_by}) does not report its version"
    return CudaToolkit(home, nvcc, version, found_by), ""


def _version_problem(toolkit: CudaToolkit, torch_cuda: str) -> str | None:
    """torch's builder refuses a toolkit whose major version differs from torch's CUDA."""
    if toolkit.version.split(".")[0] != torch_cuda.split(".")[0]:
        return (
            f"nvcc {toolkit.version} ({toolkit.nvcc}) does not match torch's CUDA {torch_cuda} "
            "(the major versions must agree; set CUDA_HOME to a matching toolkit)"
        )
    return None


def _use_toolkit(toolkit: CudaToolkit) -> None:
    """Point torch's builder at `toolkit`. torch reads its CUDA home once, at the import of
    cpp_extension, into a module global that every later step (include and library paths, the
    nvcc it runs, its version check) reads: that global is set, after CUDA_HOME in the environment
    (read by that import, so that torch's own log line names the right folder)."""
    os.environ["CUDA_HOME"] = str(toolkit.home)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(toolkit.home)


def _build_plan() -> tuple[CudaToolkit | None, str]:
    """(toolkit, "") when this machine can compile the extension, else (None, the reason)."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch is not importable ({exc})"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build (no CUDA)"
    if csrc_dir() is None:
        return None, "the CUDA sources (csrc/) are not installed with this package"
    cxx = os.environ.get("CXX") or "c++"  # the host compiler torch's builder runs
    if shutil.which(cxx.split()[0]) is None:
        return None, f"no C++ compiler ({cxx}) for the host code (install g++ or set CXX)"
    toolkit, reason = find_cuda_toolkit()
    if toolkit is None:
        return None, reason
    problem = _version_problem(toolkit, torch.version.cuda)
    return (None, problem) if problem else (toolkit, "")


def why_no_build() -> str | None:
    """None when this machine can compile the extension, else a one-line reason. The same
    checks, in the same order, as the builds below make."""
    toolkit, reason = _build_plan()
    return None if toolkit is not None else reason


def arch_list() -> str:
    """The arch list the setup.py build compiles for: TORCH_CUDA_ARCH_LIST, else the default."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def cuda_archs(arch_list: str) -> list[str]:
    """The machine-code targets of a TORCH_CUDA_ARCH_LIST: "8.0;9.0+PTX" -> ["sm_80", "sm_90"]
    (torch's syntax: ';' or ' ' between entries, "+PTX" also embeds that arch's PTX)."""
    archs = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {entry!r} in {arch_list!r}")
        archs.append(f"sm_{m.group(1)}{m.group(2)}{m.group(3)}")
    return archs


def setup_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup.py: the CUDA extension, or ([], {}) plus a one-line reason.

    CROSSVIT_FAST_SKIP_CUDA_BUILD=1 skips the build explicitly (the JIT path remains).
    """
    if os.environ.get("CROSSVIT_FAST_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        print(
            "crossvit_fast: building without the CUDA extension (CROSSVIT_FAST_SKIP_CUDA_BUILD is set)"
        )
        return [], {}
    toolkit, reason = _build_plan()
    if toolkit is None:
        print(f"crossvit_fast: building without the CUDA extension ({reason})")
        return [], {}
    _use_toolkit(toolkit)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # torch's builder reads the arch list from the environment (never a GPU when it is set).
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    root = csrc_dir()
    rel = [os.path.relpath(p, PACKAGE_DIR.parent) for p in source_paths(root)]
    ext = CUDAExtension(
        name="crossvit_fast._C",
        sources=rel,
        include_dirs=[str(root)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": _nvcc_flags()},
    )
    print(
        f"crossvit_fast: building the CUDA extension for TORCH_CUDA_ARCH_LIST={arch_list()} "
        f"with nvcc {toolkit.version} ({toolkit.home}, found by {toolkit.found_by})"
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def prebuilt_state() -> str:
    """One line for `info`: whether `crossvit_fast._C` is built and loads (with its path), or
    why not. Never builds; importing the module needs no GPU or driver."""
    import importlib
    import importlib.util

    spec = importlib.util.find_spec("crossvit_fast._C")
    if spec is None:
        reason = why_no_build()
        if reason is not None:
            return f"not built: {reason}"
        return (
            "not built (this machine can build it: pip install --no-build-isolation -e .; "
            "else the cuda backend JIT-builds it on first use)"
        )
    try:
        mod = importlib.import_module("crossvit_fast._C")
    except ImportError as exc:
        return f"built but does not load ({spec.origin}): {exc}"
    return f"built, loads: {mod.__file__}"


# -- JIT build with an inter-process lock -----------------------------------------------------


def build_dir() -> Path:
    import torch

    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    base = os.environ.get("CROSSVIT_FAST_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "crossvit_fast"
    )
    return Path(base) / tag


class BuildLockTimeout(RuntimeError):
    """Another live process held the build lock for longer than the timeout."""


@contextlib.contextmanager
def build_lock(path: str | os.PathLike, timeout: float, poll: float = 0.2):
    """Exclusive inter-process lock on `path` (created if missing), held for the `with` block.

    Uses fcntl.flock: the kernel releases it when the holder exits or is killed, so a lock file
    left behind by a dead process is simply re-acquired (never waited on). Raises
    BuildLockTimeout naming the file when a live holder keeps it longer than `timeout` seconds.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    raise BuildLockTimeout(
                        f"crossvit_fast: waited {timeout:.0f} s for the CUDA build lock {path} "
                        "held by another process; if no build is running, delete the file "
                        "(or raise CROSSVIT_FAST_BUILD_TIMEOUT)"
                    ) from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def remove_stale_torch_baton(directory: Path) -> bool:
    """Delete torch's builder baton (`<dir>/lock`). Only call while holding `build_lock`: no other
    crossvit_fast build can be running then, so the file is a leftover of a killed build."""
    baton = Path(directory) / "lock"
    if baton.exists():
        baton.unlink(missing_ok=True)
        return True
    return False


def _first_error_lines(text: str, n: int = 4) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return " | ".join((errs or lines)[:n])[:600]


def _jit_build(toolkit: CudaToolkit):
    _use_toolkit(toolkit)
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("CROSSVIT_FAST_BUILD_TIMEOUT", "1800"))
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # set: honoured, and no GPU is queried
        os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list_of_visible_gpu()
    with build_lock(directory / "crossvit_fast.build.lock", timeout):
        remove_stale_torch_baton(directory)
        root = csrc_dir()
        return cpp_extension.load(
            name="crossvit_fast_C",
            sources=source_paths(root),
            extra_include_paths=[str(root)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=_nvcc_flags(),
            build_directory=str(directory),
            verbose=os.environ.get("CROSSVIT_FAST_BUILD_VERBOSE", "0") not in ("", "0"),
        )


def _arch_list_of_visible_gpu() -> str:
    """JIT builds compile for the GPU at hand (faster than the release arch list)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def extension():
    """The loaded extension module; builds it (JIT) on first use if it was not prebuilt.

    Raises RuntimeError with the reason when it cannot be had (CPU-only torch, no GPU, no nvcc,
    build failure with the first compiler error lines). The outcome is kept for the process.
    """
    if _state["module"] is not None:
        return _state["module"]
    if _state["error"] is not None:
        raise RuntimeError(_state["error"])
    try:
        _state["module"] = _load()
    except Exception as exc:
        _state["error"] = str(exc)
        raise RuntimeError(_state["error"]) from exc
    return _state["module"]


def _load():
    import torch

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build (no CUDA)")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible to torch")
    try:
        from crossvit_fast import _C

        return _C
    except ImportError as exc:  # not prebuilt, or built for another torch (ABI / symbols)
        prebuilt_error = exc
    toolkit, reason = _build_plan()
    if toolkit is None:
        absent = isinstance(prebuilt_error, ModuleNotFoundError) or "cannot import name" in str(
            prebuilt_error
        )
        extra = "" if absent else f"; the prebuilt module failed to load: {prebuilt_error}"
        raise RuntimeError(
            f"the CUDA extension is not built and cannot be JIT-built: {reason}{extra}"
        )
    try:
        return _jit_build(toolkit)
    except BuildLockTimeout:
        raise
    except Exception as exc:
        raise RuntimeError(
            f"JIT build of the CUDA extension failed: {_first_error_lines(str(exc))}"
        ) from exc


def status() -> tuple[bool, str]:
    """(loaded, reason) without raising; loads (and possibly builds) the extension."""
    try:
        mod = extension()
    except RuntimeError as exc:
        return False, str(exc)
    where = (
        "CPU emulator (tests)" if getattr(mod, "emulated", False) else getattr(mod, "__file__", "?")
    )
    return True, f"CUDA C++ kernels loaded ({where})"


@contextlib.contextmanager
def use_extension(module):
    """Run the ops through `module` (e.g. the CPU emulator of csrc/emu) inside the block. Tests only."""
    saved = dict(_state)
    _state.update(module=module, error=None)
    try:
        yield module
    finally:
        _state.clear()
        _state.update(saved)


def emulated() -> bool:
    """Whether the extension in use is the CPU emulator build (`use_extension`); never loads one."""
    return bool(getattr(_state.get("module"), "emulated", False))


def _reset_for_tests() -> None:
    _state.update(module=None, error=None)


if __name__ == "__main__":  # python -m crossvit_fast.ops.cuda.build: build / report
    ok, why = status()
    print(("ok: " if ok else "unavailable: ") + why)
    sys.exit(0 if ok else 1)
