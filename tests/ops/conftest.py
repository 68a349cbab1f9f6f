"""Per-op test setup: a test run for the `cuda` backend on a machine without a GPU gets the CPU
emulator build of the CUDA kernels (tests/conftest.py `cuda_emulator`) as that backend's
extension, so `served("cuda", op)` finds the backend and the op's numerics run for it here too."""

from __future__ import annotations

import pytest

from ..conftest import DEVICE


@pytest.fixture(autouse=True)
def _cuda_backend_on_cpu(request):
    callspec = getattr(request.node, "callspec", None)
    if DEVICE != "cpu" or callspec is None or callspec.params.get("backend") != "cuda":
        yield
        return
    from crossvit_fast.ops.cuda import build

    with build.use_extension(request.getfixturevalue("cuda_emulator")):
        yield
