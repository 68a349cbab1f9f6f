"""Build script. The pure-Python package always installs; the optional CUDA C++ extension
(`crossvit_fast._C`) is built only when a CUDA-enabled torch and nvcc are present.

See `crossvit_fast/ops/cuda/build.py` for the arch list (TORCH_CUDA_ARCH_LIST, default 8.0;9.0)
and the JIT path used when no prebuilt extension exists.
"""

from setuptools import setup


def _extensions():
    """Return (ext_modules, cmdclass); empty with a one-line reason when the build can't happen."""
    try:
        from crossvit_fast.ops.cuda.build import setup_extension
    except ImportError as exc:  # torch absent in an isolated build env, or no cuda package yet
        print(f"crossvit_fast: building without the CUDA extension ({exc})")
        return [], {}
    return setup_extension()


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
