"""Per-op tests, `tests/ops/test_<op>.py`: each op's numerics against the reference, run for
every kernel backend that serves the op here (`served`), and its backend-specific checks (input
errors, opcheck, torch.compile, launch counts)."""

from __future__ import annotations

import pytest

from crossvit_fast.backends import backend_availability, resolve

from ..conftest import DEVICE

KERNEL_BACKENDS = ("triton", "cuda")


def served(backend: str, op: str):
    """The table's implementation of `op` from `backend` on this machine's test device; skips,
    naming why, where the backend cannot run here or has no kernel of its own for `op` (the
    reference would serve it: comparing it with itself proves nothing)."""
    ok, why = backend_availability(backend, DEVICE)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable here: {why}")
    ops = resolve(backend, DEVICE)
    if ops.sources[op] != backend:
        pytest.skip(f"backend {backend!r} has no {op} of its own ({ops.sources[op]} serves it)")
    return getattr(ops, op)
