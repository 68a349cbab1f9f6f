"""Build script. The pure-Python package always installs; the optional CUDA C++ extension
(`crossvit_fast._C`) is built only when a CUDA-enabled torch and nvcc are present.

See `crossvit_fast/ops/cuda/build.py` for the arch list (TORCH_CUDA_ARCH_LIST, default 8.0;9.0)
and the JIT path used when no prebuilt extension exists. The kernel sources (csrc/) are copied
into wheels as `crossvit_fast/_csrc` so that the JIT path works from an installed wheel too.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_csrc(build_py):
    def run(self):
        super().run()
        src = ROOT / "csrc"
        if src.is_dir() and not self.editable_mode:
            dst = Path(self.build_lib) / "crossvit_fast" / "_csrc"
            shutil.copytree(src, dst, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.o", "__pycache__", "emu"))  # fmt: skip


def _extensions():
    """Return (ext_modules, cmdclass); empty with a one-line reason when the build can't happen."""
    try:
        from crossvit_fast.ops.cuda.build import setup_extension
    except ImportError as exc:  # torch absent in an isolated build env, or no cuda package yet
        print(f"crossvit_fast: building without the CUDA extension ({exc})")
        return [], {}
    return setup_extension()


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": build_py_with_csrc, **cmdclass})
