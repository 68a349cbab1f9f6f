"""Per-op tests, `tests/ops/test_<op>.py`: each op's numerics against the reference, run for
every kernel backend that serves the op here (`served`), and its backend-specific checks (input
errors, opcheck, torch.compile, launch counts: the Triton implementation's own contract). On a
machine without a GPU the `cuda` backend runs through the CPU emulator build of its kernels
(tests/ops/conftest.py). A backend that cannot run here, or has no kernel of its own for the op,
is skipped naming why."""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.backends import backend_availability, resolve

from ..conftest import DEVICE
from ..numerics import BWD_OPCHECK

KERNEL_BACKENDS = ("triton", "cuda")
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def gpu_tier(dtypes=GPU_DTYPES):
    """Marks an op's GPU-tier numerics test: `gpu`, run for every kernel backend (`backend`) and
    each of `dtypes` (`dtype`). The test's own shapes' parametrize goes below it."""

    def mark(test):
        test = pytest.mark.parametrize("dtype", list(dtypes))(test)
        return pytest.mark.parametrize("backend", KERNEL_BACKENDS)(pytest.mark.gpu(test))

    return mark


def opcheck_backward(op: str, args) -> None:
    """opcheck of the registered backward op `crossvit_fast::<op>_backward` (the checks left to
    prove for it, BWD_OPCHECK)."""
    backward = getattr(torch.ops.crossvit_fast, f"{op}_backward")
    torch.library.opcheck(backward.default, args, test_utils=BWD_OPCHECK)


def assert_compiles_like_eager(f, inputs, wrt) -> None:
    """`f` under torch.compile (fullgraph=True: it traces without a graph break; aot_eager) gives
    eager's output and eager's gradients of `out.sum()` with respect to the tensors `wrt`."""
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs)
    grads = torch.autograd.grad(out.sum(), wrt)
    ref = f(*inputs)
    refs = torch.autograd.grad(ref.sum(), wrt)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r)
