"""Building and loading the CUDA extension (`crossvit_fast._C`).

Three ways the kernels in csrc/ reach Python:

* prebuilt: `setup.py` calls `setup_extension()`, which returns a `CUDAExtension` when torch has
  CUDA and nvcc exists (`pip install --no-build-isolation .` on a GPU machine), built for
  TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS honoured by torch's ninja build. Otherwise
  the package installs pure-Python and `setup_extension` says why in one line.
* JIT: without a prebuilt module, `extension()` compiles the sources with
  `torch.utils.cpp_extension.load` on first use (into CROSSVIT_FAST_BUILD_DIR, default
  ~/.cache/crossvit_fast/<torch version>-<cuda version>), under an exclusive `flock` on a lock
  file. The kernel drops an flock when its holder dies, so a killed build leaves no lock behind;
  waiting is bounded (CROSSVIT_FAST_BUILD_TIMEOUT seconds, default 1800) and ends in a clear
  error. Under that lock the stale baton file of torch's own builder (`<build dir>/lock`, left by a
  killed `load`, which would make torch wait forever) is removed first.
* tests: `use_extension(module)` installs another module (the CPU emulator of csrc/emu).

Nothing here runs at `import crossvit_fast`; `extension()` is first called by the backend's
`availability("cuda")` or by the first op. Its outcome (module or the reason it is unavailable)
is kept for the life of the process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2]  # .../crossvit_fast
DEFAULT_ARCH_LIST = "8.0;9.0"
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


def why_no_build() -> str | None:
    """None when this machine can compile the extension, else a one-line reason."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return f"torch is not importable ({exc})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA)"
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=_nvcc_search_path()) is None:
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    if csrc_dir() is None:
        return "the CUDA sources (csrc/) are not installed with this package"
    return None


def _nvcc_search_path() -> str:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    extra = [os.path.join(home, "bin")] if home else []
    return os.pathsep.join(extra + [os.environ.get("PATH", "")])


def setup_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup.py: the CUDA extension, or ([], {}) plus a one-line reason.

    CROSSVIT_FAST_SKIP_CUDA_BUILD=1 skips the build explicitly (the JIT path remains).
    """
    if os.environ.get("CROSSVIT_FAST_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        print(
            "crossvit_fast: building without the CUDA extension (CROSSVIT_FAST_SKIP_CUDA_BUILD is set)"
        )
        return [], {}
    reason = why_no_build()
    if reason is not None:
        print(f"crossvit_fast: building without the CUDA extension ({reason})")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    root = csrc_dir()
    rel = [os.path.relpath(p, PACKAGE_DIR.parent) for p in source_paths(root)]
    ext = CUDAExtension(
        name="crossvit_fast._C",
        sources=rel,
        include_dirs=[str(root)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": _nvcc_flags()},
    )
    print(
        f"crossvit_fast: building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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


def _jit_build():
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("CROSSVIT_FAST_BUILD_TIMEOUT", "1800"))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _arch_list_of_visible_gpu())
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
    reason = why_no_build()
    if reason is not None:
        absent = isinstance(prebuilt_error, ModuleNotFoundError) or "cannot import name" in str(
            prebuilt_error
        )
        extra = "" if absent else f"; the prebuilt module failed to load: {prebuilt_error}"
        raise RuntimeError(
            f"the CUDA extension is not built and cannot be JIT-built: {reason}{extra}"
        )
    try:
        return _jit_build()
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


def _reset_for_tests() -> None:
    _state.update(module=None, error=None)


if __name__ == "__main__":  # python -m crossvit_fast.ops.cuda.build: build / report
    ok, why = status()
    print(("ok: " if ok else "unavailable: ") + why)
    sys.exit(0 if ok else 1)
