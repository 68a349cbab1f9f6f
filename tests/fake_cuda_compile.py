"""Trace torch.compile(fullgraph=True) through the GPU registration path with fake CUDA tensors.

Run as a script by `tests/test_toolchain_triton.py` (a CUDA-enabled torch, no GPU, no
TRITON_INTERPRET). On the GPU path every Triton op is a `torch.library.triton_op` whose body
launches through `wrap_triton`, so AOTAutograd traces into it and the graph holds the kernels
(`triton_kernel_wrapper_functional` nodes); under the interpreter the same bodies are opaque
custom ops, so only this check sees what Inductor would get on a GPU.

* The model's inference forward, whole (one graph), in fp32 and under bf16 autocast.
* Each backward op's body, alone. A training step's joint graph cannot be traced here: the
  autograd engine sets up a CUDA stream per device, which needs a driver that fake tensors cannot
  stand in for. So the backward ops' inputs are recorded from a CPU run of the same ops (kernels
  compile-only, see sm90_compile.py) and replayed as fake CUDA tensors.

Prints FAKE_CUDA + JSON: {"graphs": {case: n}, "kernels": {case: n}, "backward_ops": {op: n},
"errors": {case: message}}.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from pathlib import Path

import torch
import triton
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sm90_compile

import crossvit_fast
from crossvit_fast.ops import triton as triton_backend
from crossvit_fast.ops.triton import utils

WRAPPER = "triton_kernel_wrapper"


class _H100Properties:
    multi_processor_count = 132  # what the launchers' grid plans ask the runtime


def _patch_for_fake_cuda() -> None:
    """No driver here: stand-ins for what the launchers and autocast ask the CUDA runtime."""
    triton.runtime.driver.set_active(sm90_compile._Sm90Driver())
    triton_backend.availability = lambda device_type: (True, "fake CUDA")
    torch.cuda.get_device_properties = lambda device=None: _H100Properties()
    torch.cuda.device = lambda device: contextlib.nullcontext()  # the launchers' device guard


def _config(multi_conv: bool = False, **kw):
    # crossvit_tiny_240's widths / heads (ratio 4); the second branch's two blocks run as one
    # `blocks` op (its autograd Function over the `block` ops is traced too).
    return crossvit_fast.model_config(
        "crossvit_tiny_240", depth=((1, 2, 0),), num_classes=10, multi_conv=multi_conv, **kw
    )


@contextlib.contextmanager
def _cuda_autocast(enabled: bool):
    """torch.autocast("cuda", bf16) without a driver: autocast disables itself when
    torch.cuda.is_available() is False and asks the device about bf16, so it is entered with both
    answers patched (only then: dynamo saves the CUDA RNG state whenever it says True)."""
    real = torch.cuda.is_available, torch.cuda.is_bf16_supported
    torch.cuda.is_available = torch.cuda.is_bf16_supported = lambda *a, **k: True
    try:
        ctx = torch.autocast("cuda", torch.bfloat16, enabled=enabled)
        ctx.__enter__()
    finally:
        torch.cuda.is_available, torch.cuda.is_bf16_supported = real
    try:
        yield
    finally:
        ctx.__exit__(None, None, None)


def _compile_and_count(fn, *args) -> tuple[int, int]:
    """(graphs, Triton kernels in the forward graphs) of torch.compile(fn, fullgraph=True)."""
    graphs: list = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record))
    compiled(*args)
    return len(graphs), sum(gm.code.count(f"{WRAPPER}_functional(") for gm in graphs)


class _RecordBackwardOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("crossvit_fast::") and name.endswith("_backward"):
            self.calls.setdefault(name, (func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _backward_op_inputs(model) -> dict:
    """op name -> (op, args, kwargs) of its first call in a CPU forward + backward (kernels
    compile-only: the values are garbage, the shapes and dtypes are the real ones)."""
    report: dict = {}
    real_wrap = utils.wrap_triton
    utils.wrap_triton = sm90_compile.CompileOnly(report)
    try:
        x = torch.randn(2, 3, 240, 240)
        with _RecordBackwardOps() as rec:
            model(x).sum().backward()
    finally:
        utils.wrap_triton = real_wrap
    return rec.calls


def _to_fake_cuda(mode: FakeTensorMode, value):
    if isinstance(value, torch.Tensor):
        with mode:
            return torch.empty_strided(
                value.shape, value.stride(), dtype=value.dtype, device="cuda"
            )
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fake_cuda(mode, v) for v in value)
    return value


# backward op -> positions of (x, qkv, the SDPA saved tensors, num_heads) in its arguments
_SDPA_ARGS = {
    "crossvit_fast::self_attention_backward": (1, 9, 11, 12),
    "crossvit_fast::block_backward": (1, 14, 21, 22),
}


def _cuda_sdpa_saved(mode: FakeTensorMode, name: str, args: tuple) -> tuple:
    """A backward op's SDPA tensors as the CUDA kernels save them (the CPU run recorded the CPU
    kernel's): the forward kernel run on the fake CUDA q / k / v."""
    from crossvit_fast.ops.triton.self_attention import _heads, sdpa_forward

    ix, iqkv, isaved, iheads = _SDPA_ARGS[name]
    x, qkv, heads = args[ix], args[iqkv], args[iheads]
    B, N, C = x.shape
    with mode:
        q, k, v = (_heads(t, B, N, heads) for t in qkv.split(C, dim=1))
        _, saved = sdpa_forward(q, k, v)
    return (*args[:isaved], saved, *args[isaved + 1 :])


def main() -> None:
    _patch_for_fake_cuda()
    out = {"graphs": {}, "kernels": {}, "backward_ops": {}, "errors": {}}
    cpu_model = crossvit_fast.CrossViT(_config(), backend="triton")
    dagger = crossvit_fast.CrossViT(_config(multi_conv=True), backend="triton")  # token_assemble
    # drop-path active: the blocks run as their two halves (`self_attention`, `mlp`)
    halves = crossvit_fast.CrossViT(_config(drop_path_rate=0.1), backend="triton")
    calls = {
        **_backward_op_inputs(halves), **_backward_op_inputs(dagger),
        **_backward_op_inputs(cpu_model),
    }  # fmt: skip
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = cpu_model.eval().to("cuda")
        x = torch.randn(2, 3, 240, 240, device="cuda")
    for case, amp in (("inference/fp32", False), ("inference/bf16-autocast", True)):
        try:
            with mode, torch.no_grad(), _cuda_autocast(amp):
                out["graphs"][case], out["kernels"][case] = _compile_and_count(model, x)
        except Exception as exc:
            out["errors"][case] = "".join(traceback.format_exception(exc))[-4000:]
        torch._dynamo.reset()
    for name, (op, args, kwargs) in sorted(calls.items()):
        try:
            fargs, fkwargs = _to_fake_cuda(mode, args), _to_fake_cuda(mode, kwargs)
            if name in _SDPA_ARGS:
                fargs = _cuda_sdpa_saved(mode, name, fargs)
            with mode:
                _, out["backward_ops"][name] = _compile_and_count(
                    lambda *a, op=op, kw=fkwargs: op(*a, **kw), *fargs
                )
        except Exception as exc:
            out["errors"][name] = "".join(traceback.format_exception(exc))[-4000:]
        torch._dynamo.reset()
    print("FAKE_CUDA" + json.dumps(out))


if __name__ == "__main__":
    main()
