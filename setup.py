"""Build script. The pure-Python package always installs; the optional CUDA C++ extension
(`crossvit_fast._C`) is built only when a CUDA-enabled torch and nvcc are present.

See `crossvit_fast/ops/cuda/build.py` for the arch list (TORCH_CUDA_ARCH_LIST, default
8.0;9.0+PTX), how the CUDA toolkit is found, and the JIT path used when no prebuilt extension
exists. The kernel sources (csrc/) are copied
into wheels as `crossvit_fast/_csrc` so that the JIT path works from an installed wheel too.
"""

import importlib.util
import shutil
import sys
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
            skip = shutil.ignore_patterns("*.o", "__pycache__", "emu")
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=skip)


def _build_helpers():
    """crossvit_fast/ops/cuda/build.py, loaded by file path: under setuptools.build_meta (pip) the
    source tree is not on sys.path, so `import crossvit_fast...` fails; build.py imports only the
    standard library at import time (torch lazily, which is why no try/except is needed here: a
    missing torch is one of the reasons setup_extension reports)."""
    path = ROOT / "crossvit_fast" / "ops" / "cuda" / "build.py"
    spec = importlib.util.spec_from_file_location("_crossvit_fast_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ext_modules, cmdclass = _build_helpers().setup_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": build_py_with_csrc, **cmdclass})
