"""Numerical acceptance rules shared by the kernel tests (flash-attention's rule).

An implementation run in dtype `dt` is compared with a float64 reference of the same op. Its
error must be at most `factor` (2) times the error that plain PyTorch (the reference op run in
`dt`) makes against the same float64 reference, plus a stated floor for the dtype:

    max|ours - ref64| <= factor * max|torch_dt - ref64| + floor[dt] * max|ref64|

The floor covers cases where PyTorch happens to be exact (error 0) and the fp32 accumulation
order of a fused kernel legitimately differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Relative floors, per dtype (times max |ref|): fp32 ~ a few ulps after long reductions; bf16/fp16
# a fraction of one ulp of the output format.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_2x_rule(
    ours: Tensor,
    torch_dt: Tensor,
    ref64: Tensor,
    name: str = "output",
    factor: float = 2.0,
    floor: float | None = None,
    scale: float | None = None,
) -> None:
    """ours / torch_dt: results in the tested dtype; ref64: float64 reference result. The floor
    is relative to `scale`, by default max|ref64|; a gradient's test passes the op's largest
    gradient, since a small or exactly-zero gradient (dW_q when softmax sees one key) is a
    difference of large terms and inherits their rounding."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    if ref64.numel() == 0:
        return
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    fl = FLOOR[ours.dtype] if floor is None else floor
    scale = ref64.abs().max().item() if scale is None else scale
    e_ours, e_torch = max_err(ours, ref64), max_err(torch_dt, ref64)
    bound = factor * e_torch + fl * scale
    assert e_ours <= bound, (
        f"{name} ({ours.dtype}): error {e_ours:.3e} > {factor} x PyTorch's {e_torch:.3e} "
        f"+ floor {fl:.0e} x {scale:.3e} = {bound:.3e}"
    )


# Backward ops: their autograd / AOT dispatch is already exercised through the forward op's
# opcheck (its backward calls them); schema and fake-kernel checks are what is left to prove.
BWD_OPCHECK = ("test_schema", "test_faketensor")


def check_against_reference(ours, ref, inputs, dtype, *, grads=True, name=""):
    """Run `ours` and `ref` on `inputs` cast to `dtype` and `ref` in float64; assert the 2x rule
    on the output and on the gradient of every floating input that is not None.

    inputs: list of float64 tensors / None / other arguments (passed through)."""
    cast = lambda dt: [
        t.detach().to(dt).requires_grad_(grads) if isinstance(t, torch.Tensor) else t
        for t in inputs
    ]
    x64, xdt, xours = cast(torch.float64), cast(dtype), cast(dtype)
    out64, outdt, out = ref(*x64), ref(*xdt), ours(*xours)
    assert out.dtype == outdt.dtype, f"{name}: dtype {out.dtype} != reference {outdt.dtype}"
    assert_2x_rule(out, outdt, out64, f"{name} output")
    if not grads:
        return out
    g = torch.randn_like(out64)
    tensors = lambda xs: [t for t in xs if isinstance(t, torch.Tensor)]
    gr64 = torch.autograd.grad(out64, tensors(x64), g)
    grdt = torch.autograd.grad(outdt, tensors(xdt), g.to(outdt.dtype))
    gours = torch.autograd.grad(out, tensors(xours), g.to(out.dtype))
    for i, (a, b, c) in enumerate(zip(gours, grdt, gr64)):
        assert a.dtype == b.dtype, f"{name} grad {i}: dtype {a.dtype} != {b.dtype}"
        assert_2x_rule(a, b, c, f"{name} grad of input {i}")
    return out
