"""The cost ledger: launches, DRAM bytes, FLOPs and an estimated GPU time of one training step or
one inference forward, counted without a GPU and without allocating a byte of activations.

How it counts (`python -m crossvit_fast cost`, or `ledger(...)`):

* The model, its inputs, gradients and optimizer state are FakeTensors (shapes, no data). They are
  CPU fake tensors: fake CUDA tensors cannot run backward without a CUDA driver (the autograd
  engine asks the device for a stream), so the GPU is modelled instead: autocast is the CPU
  policy (matmuls / convolutions / SDPA in the low dtype, LayerNorm left in its input's dtype,
  which is fp32 in CrossViT's residual stream as CUDA's policy makes it), AdamW runs its
  multi-tensor (`foreach`) implementation as it does by default on CUDA, and the Triton launchers
  plan their grids for the named GPU's SM count.
* A TorchDispatchMode sees every aten op. An op that launches a kernel counts as one launch that
  reads its inputs once and writes its outputs once (a broadcast input: its distinct elements);
  views, allocations and metadata ops launch nothing and are skipped. FLOPs of the matrix ops
  (mm, addmm, bmm, baddbmm, convolution and its backward, SDPA and its backward) come from
  shapes; elementwise / reduction ops count one FLOP per output element (they are memory-bound).
  A multi-tensor (`_foreach_*`) op counts the launches CUDA's multi_tensor_apply makes.
* The Triton backend's registered ops (`crossvit_fast::*`) run their Python bodies (the same code
  as on the GPU) with `utils.wrap_triton` replaced by a recorder: each launch is logged with its
  grid, arguments and constexprs (an autotuned kernel: the first config its pruning keeps, the
  config the interpreter runs) and costed by the formula registered beside the kernel
  (`utils.register_cost`), computed from the grid and tile plan. Those formulas count the bytes
  the kernel's programs load and store (`issued_bytes`, checked against Triton's interpreter at
  small shapes, tests/test_cost.py) and, as DRAM bytes, the same less the repeats that L2 serves:
  a GEMM operand re-read by every tile of a row or column (as for cuBLAS, whose GEMMs count each
  operand once), a program re-reading its own rows.
* Time per kernel: max(DRAM bytes / DRAM bandwidth, issued bytes / L2 bandwidth, FLOPs / rate)
  + a fixed launch cost (the roofline, no overlap between kernels). The L2 term is what a Triton
  kernel pays for its repeats (a GEMM re-reading its A operand per column tile); for an aten op
  issued = DRAM bytes, so it never binds. The rate is the tensor-core rate for 16-bit matrix ops
  and the fp32 rate otherwise. These are estimates: calibrate them against
  `benchmarks/bench_model.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["GPU", "GPUS", "Ledger", "format_table", "ledger", "main"]


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    dram_bytes_per_s: float  # achievable device-memory bandwidth
    l2_bytes_per_s: float  # achievable L2 bandwidth: bounds kernels whose loads mostly hit L2
    matrix_flops_16: float  # dense bf16 / fp16 tensor-core rate reached by cuBLAS
    fp32_flops: float  # fp32 FMA rate (no TF32: torch's default float32 matmul precision)
    launch_s: float  # fixed cost per kernel launch (launch + tail of a short kernel)
    sm_count: int  # what the Triton launchers plan their grids for


GPUS = {
    "h100": GPU("H100 SXM", 3.0e12, 7.0e12, 790e12, 60e12, 4e-6, 132),
    "h200": GPU("H200 SXM", 4.3e12, 7.0e12, 790e12, 60e12, 4e-6, 132),
}

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}

# Aten ops that launch no kernel: allocation, metadata, host-side scalars. (View ops are
# recognised by their schema: `OpOverload.is_view`.)
_NO_LAUNCH = (
    {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "set_"}
    | {"detach", "lift_fresh", "lift_fresh_copy", "alias", "_unsafe_view", "view", "as_strided"}
    | {"_reshape_alias", "unbind", "split", "split_with_sizes", "chunk", "expand", "t"}
    | {"transpose", "permute", "select", "slice", "unsqueeze", "squeeze", "_local_scalar_dense"}
    | {"sym_size", "sym_stride", "sym_numel", "is_same_size", "result_type"}
)

# Ops whose tensor arguments are not read: factories "like" a tensor and fills.
_WRITE_ONLY = {"zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like"}
_WRITE_ONLY |= {"zero_", "fill_", "uniform_", "normal_", "random_"}

# CUDA's multi_tensor_apply (the `_foreach_*` kernels): tensors and 64K-element chunks per launch,
# by the number of tensor lists of the op (ATen's depth_to_max_tensors / depth_to_max_blocks).
_MTA_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MTA_BLOCKS, _MTA_CHUNK = 320, 65536


def _tensors(tree) -> list[torch.Tensor]:
    out = []
    for v in tree if isinstance(tree, (list, tuple)) else (tree,):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


def _copied(outputs: list, args) -> bool:
    """Whether an op whose schema may alias its input (`to`, `reshape`, `contiguous`, ...) made a
    copy instead: such composite ops reach a dispatch mode whole when called from inside a custom
    op's body, and their copy kernel runs below it unseen."""
    inputs = _tensors(list(args))
    return any(not any(torch._C._is_alias_of(o, i) for i in inputs) for o in outputs)


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of t (a broadcast / expanded dim is read once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _io_bytes(inputs: list, outputs: list) -> int:
    seen: set[int] = set()
    total = 0
    for group in (inputs, outputs):
        for t in group:
            if id(t) in seen:  # an in-place op's output is its input: written, counted again
                continue
            seen.add(id(t))
            total += _distinct_bytes(t)
        seen = set()
    return total


def _matrix_flops(name: str, args, kwargs, out) -> int | None:
    """FLOPs (2 per multiply-add) of the matrix ops, from shapes; None for other ops."""
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
        return 2 * math.prod(a.shape) * b.shape[-1]
    if name in ("matmul", "dot", "mv", "vdot"):
        a = args[0]
        return 2 * out.numel() * a.shape[-1]
    if name == "convolution":
        w = args[1]
        return 2 * out.numel() * math.prod(w.shape[1:])
    if name == "convolution_backward":
        grad_out, w = args[0], args[2]
        mask = args[-1]
        per = 2 * grad_out.numel() * math.prod(w.shape[1:])
        return per * (int(mask[0]) + int(mask[1]))
    if name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
        q, k = args[0], args[1]
        qk = 2 * math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + args[2].shape[-1])
        # backward: dV, dP, dQ, dK plus the recomputed logits: 2.5x the forward's two GEMMs
        return int(2.5 * qk) if "backward" in name else qk
    return None


@dataclasses.dataclass
class Entry:
    phase: str
    name: str  # "aten::mm", "triton:_fused_linear_kernel"
    launches: int
    dram_bytes: int
    flops: int
    matrix: bool  # FLOPs on the tensor cores (16-bit) or the fp32 units
    low_precision: bool
    issued_bytes: int = -1  # Triton: bytes its programs load + store (L2 hits included)

    def __post_init__(self):
        if self.issued_bytes < 0:
            self.issued_bytes = self.dram_bytes


class Ledger(TorchDispatchMode):
    """Records every aten op and Triton launch dispatched while active (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.entries: list[Entry] = []
        self.phase = "forward"
        self.missing_formulas: set[str] = set()

    # -- aten ops ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns == "crossvit_fast":
            return self._run_body(func, args, kwargs)
        out = func(*args, **kwargs)
        base = func._schema.name.split("::")[-1]
        if ns not in ("aten", "prims") or base in _NO_LAUNCH:
            return out
        outputs = _tensors(out)
        if func.is_view and not _copied(outputs, args):
            return out  # a view; `to` / `reshape` / `contiguous` that copied are counted below
        if base in _WRITE_ONLY or base.startswith("new_"):
            inputs = []  # `self` gives the shape / dtype / device, or is only written
        elif base == "copy_":
            inputs = _tensors(args[1:2])  # dst is written, not read
        else:  # an `out=` tensor is written, not read
            inputs = _tensors(list(args) + [v for k, v in kwargs.items() if k != "out"])
        if not outputs and not base.endswith("_"):
            return out
        if base.startswith("_foreach_") and all(t.ndim == 0 for t in inputs):
            return out  # optimizer step counters: host-side (CPU) tensors on a GPU too
        nbytes = _io_bytes(inputs, outputs)
        if nbytes == 0:
            return out
        launches = 1
        if base.startswith("_foreach_"):
            lists = [a for a in args if isinstance(a, (list, tuple)) and _tensors(a)]
            depth = len(lists) + (0 if base.endswith("_") else 1)  # + the output list
            ts = _tensors(lists[0]) if lists else []
            chunks = sum(math.ceil(t.numel() / _MTA_CHUNK) for t in ts)
            launches = max(
                math.ceil(len(ts) / _MTA_TENSORS.get(depth, 30)), math.ceil(chunks / _MTA_BLOCKS)
            )
        mflops = _matrix_flops(base, args, kwargs, outputs[0] if outputs else None)
        low = any(t.dtype in (torch.float16, torch.bfloat16) for t in inputs)
        flops = mflops if mflops is not None else sum(t.numel() for t in outputs)
        self.entries.append(
            Entry(self.phase, f"aten::{base}", launches, nbytes, flops, mflops is not None, low)
        )
        return out

    def _run_body(self, func, args, kwargs):
        """A crossvit_fast op: run its Python body here, so the aten ops and Triton launches
        inside it are recorded (the op itself is a dispatcher entry, not a kernel)."""
        from torch._library.custom_ops import OPDEFS

        qualname = func._schema.name
        opdef = OPDEFS.get(qualname)
        if opdef is None:  # not a Python custom op: no body to look into
            return func(*args, **kwargs)
        with self:
            return opdef._init_fn(*args, **kwargs)

    # -- Triton launches (through crossvit_fast.ops.triton.utils.launch -> wrap_triton) ------
    def record_launch(self, kernel, grid, args, meta) -> None:
        from triton.runtime.autotuner import Autotuner

        from .ops.triton import utils

        if isinstance(kernel, Autotuner):
            named = dict(zip(kernel.arg_names, args))
            prune = kernel.early_config_prune
            configs = prune(kernel.configs, named, **meta) if prune else kernel.configs
            meta = {**meta, **configs[0].all_kwargs()}
            kernel = kernel.fn
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        if callable(grid):
            grid = grid(meta)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        named = dict(zip(kernel.arg_names, args))
        formula = utils.KERNEL_COSTS.get(name)
        if formula is None:  # an upper-bound guess: every tensor argument read once
            self.missing_formulas.add(name)
            nbytes, flops = sum(_distinct_bytes(t) for t in _tensors(list(args))), 0
            issued, mm = nbytes, False
        else:
            issued, flops, *dram = formula(named, meta, grid)
            nbytes = dram[0] if dram else issued
            mm = flops > 0
        low = any(
            t.dtype in (torch.float16, torch.bfloat16) for t in _tensors(list(args)) if t.ndim > 1
        )
        self.entries.append(
            Entry(self.phase, f"triton:{name}", 1, int(nbytes), int(flops), mm, low, int(issued))
        )

    # -- summary ----------------------------------------------------------------------------
    def seconds(self, e: Entry, gpu: GPU) -> float:
        rate = gpu.matrix_flops_16 if (e.matrix and e.low_precision) else gpu.fp32_flops
        memory = max(e.dram_bytes / gpu.dram_bytes_per_s, e.issued_bytes / gpu.l2_bytes_per_s)
        return max(memory, e.flops / rate) + e.launches * gpu.launch_s

    def ops(self, gpu: GPU) -> list[dict]:
        rows: dict = defaultdict(
            lambda: {"launches": 0, "dram_bytes": 0, "issued_bytes": 0, "flops": 0, "est_s": 0.0}
        )
        for e in self.entries:
            r = rows[(e.phase, e.name)]
            r["launches"] += e.launches
            r["dram_bytes"] += e.dram_bytes
            r["issued_bytes"] += e.issued_bytes
            r["flops"] += e.flops
            r["est_s"] += self.seconds(e, gpu)
        out = [
            {
                "phase": p,
                "op": n,
                **{k: v for k, v in r.items() if k != "est_s"},
                "est_ms": r["est_s"] * 1e3,
            }
            for (p, n), r in rows.items()
        ]
        return sorted(out, key=lambda r: (_PHASES.index(r["phase"]), -r["est_ms"]))


_PHASES = ("forward", "backward", "optimizer")


class _Recorder:
    """Stands in for `torch.library.wrap_triton`: `wrap_triton(kernel)[grid](*args, **meta)`
    logs the launch in the ledger and launches nothing."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def __call__(self, kernel):
        return _RecordGrid(self.ledger, kernel)


class _RecordGrid:
    def __init__(self, ledger: Ledger, kernel):
        self.ledger, self.kernel = ledger, kernel

    def __getitem__(self, grid):
        return lambda *args, **meta: self.ledger.record_launch(self.kernel, grid, args, meta)


@contextlib.contextmanager
def _triton_as_on_gpu(ledger: Ledger, gpu: GPU):
    """The Triton backend on fake CPU tensors, planned as on `gpu`: available, the GPU program
    (not the interpreter's), launches recorded, grids sized for the GPU's SMs."""
    import importlib

    from .ops import triton as triton_backend
    from .ops.triton import _KERNEL_MODULES, utils

    saved = []

    def patch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    real_sm_count = utils.sm_count
    fake_sm_count = lambda device: gpu.sm_count
    patch(triton_backend, "availability", lambda device_type: (True, f"ledger for {gpu.name}"))
    patch(utils, "interpreter_enabled", lambda: False)
    patch(utils, "wrap_triton", _Recorder(ledger))
    patch(utils, "sm_count", fake_sm_count)
    for mod in _KERNEL_MODULES:  # modules that bound sm_count by name
        m = importlib.import_module(f"{triton_backend.__name__}.{mod}")
        if getattr(m, "sm_count", None) is real_sm_count:
            patch(m, "sm_count", fake_sm_count)
    # (shared helper modules, e.g. gemm, call utils.sm_count: patched above)
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def _model_config(model: str):
    from .config import CrossViTConfig
    from .registry import model_config

    if model.endswith(".json"):
        return CrossViTConfig(**json.loads(Path(model).read_text()))
    return model_config(model)


def ledger(
    model,
    batch: int,
    amp: str = "bf16",
    backend: str = "reference",
    *,
    inference: bool = False,
    gpu: str = "h100",
) -> dict:
    """The cost report (the JSON of `cost --json`) of one training step (forward, cross-entropy
    loss, backward, AdamW step) or one inference forward. `model`: a registered name, a config
    JSON path, or a CrossViTConfig."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .config import CrossViTConfig
    from .model import CrossViT

    g = GPUS[gpu]
    if backend not in ("reference", "triton", "auto"):
        raise ValueError(
            f"cost: backend {backend!r} has no cost model (its kernels are not Triton launches "
            "with formulas); use reference, triton or auto"
        )
    cfg = model if isinstance(model, CrossViTConfig) else _model_config(model)
    name = model if isinstance(model, str) else "config"
    rec = Ledger()
    stack = contextlib.ExitStack()
    with stack:
        if backend in ("triton", "auto"):
            stack.enter_context(_triton_as_on_gpu(rec, g))
        # AdamW's bias correction reads the step count (an .item() of a fake tensor otherwise).
        stack.enter_context(_first_step_values())
        resolved = "triton" if backend == "auto" else backend  # auto on a GPU: Triton first
        # Built for real (its init reads values: drop-path schedule), then every parameter and
        # buffer swapped for a fake one: only the parameters are ever real, never activations.
        net = CrossViT(cfg, backend=resolved)
        mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        _to_fake(net, mode)
        net.train(not inference)
        sizes = [s if isinstance(s, (tuple, list)) else (s, s) for s in cfg.img_size]
        x = torch.empty(batch, cfg.in_chans, max(h for h, _ in sizes), max(w for _, w in sizes))
        target = torch.zeros(batch, dtype=torch.long)
        opt = None
        if not inference:
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=True)
            for p in net.parameters():  # a steady-state step: the moments exist already
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        del mode
        amp_ctx = (
            torch.autocast("cpu", _AMP[amp]) if _AMP[amp] is not None else contextlib.nullcontext()
        )
        with rec:
            rec.phase = "forward"
            with amp_ctx, torch.set_grad_enabled(not inference):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), target) if not inference else None
            if not inference:
                rec.phase = "backward"
                loss.backward()
                rec.phase = "optimizer"
                opt.step()
                opt.zero_grad(set_to_none=True)
    ops = rec.ops(g)
    keys = ("launches", "dram_bytes", "issued_bytes", "flops", "est_ms")
    totals = {k: sum(r[k] for r in ops) for k in keys}
    return {
        "model": name,
        "batch": batch,
        "amp": amp,
        "backend": backend,
        "gpu": gpu,
        "step": "inference forward" if inference else "training step (fwd + bwd + AdamW)",
        "estimate": True,
        "assumptions": {
            "gpu": g.name,
            "dram_bytes_per_s": g.dram_bytes_per_s,
            "l2_bytes_per_s": g.l2_bytes_per_s,
            "matrix_flops_16bit": g.matrix_flops_16,
            "fp32_flops": g.fp32_flops,
            "launch_s": g.launch_s,
            "sm_count": g.sm_count,
            "time": "per kernel max(DRAM bytes / DRAM bandwidth, issued bytes / L2 bandwidth, "
            "flops / rate) + launch; no overlap between kernels",
            "aten": "each kernel reads its inputs once and writes its outputs once",
            "triton": "DRAM: bytes its programs load and store less the repeats L2 serves "
            "(GEMM operand tiles, a program re-reading its own rows); issued_bytes: all of them "
            "(the formula beside each kernel, checked against the interpreter)",
            "optimizer": "AdamW foreach (CUDA's default), multi_tensor_apply launch counts",
            "autocast": "CPU policy on fake CPU tensors (see crossvit_fast.cost)",
            "missing_formulas": sorted(rec.missing_formulas),
        },
        "totals": totals,
        "ops": ops,
    }


def _to_fake(net: torch.nn.Module, mode) -> None:
    for m in net.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(mode.from_tensor(p.detach()), p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = mode.from_tensor(b)


@contextlib.contextmanager
def _first_step_values():
    """`torch.optim` reads the step count with `.item()` for the bias corrections: a fake tensor
    has no value, so report step 1 (the first step; the cost does not depend on it)."""
    import torch.optim.adam as adam
    from torch._subclasses.fake_tensor import is_fake

    real = adam._get_value
    adam._get_value = lambda x: 1.0 if isinstance(x, torch.Tensor) and is_fake(x) else real(x)
    try:
        yield
    finally:
        adam._get_value = real


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_table(report: dict, top: int = 0) -> str:
    a = report["assumptions"]
    t = report["totals"]
    lines = [
        f"ESTIMATES (no GPU was used): {report['model']} B={report['batch']} amp={report['amp']} "
        f"backend={report['backend']}, {report['step']}, on a modelled {a['gpu']}",
        f"assumptions: {a['dram_bytes_per_s'] / 1e12:.1f} TB/s DRAM, "
        f"{a['l2_bytes_per_s'] / 1e12:.1f} TB/s L2, "
        f"{a['matrix_flops_16bit'] / 1e12:.0f} TFLOP/s 16-bit matrix, "
        f"{a['fp32_flops'] / 1e12:.0f} TFLOP/s fp32, {a['launch_s'] * 1e6:.0f} us per launch, "
        f"{a['sm_count']} SMs; {a['time']}",
        f"{'phase':10s} {'op':42s} {'launches':>8s} {'DRAM':>10s} {'issued':>10s} {'GFLOP':>9s} "
        f"{'est ms':>8s}",
    ]
    ops = report["ops"] if not top else sorted(report["ops"], key=lambda r: -r["est_ms"])[:top]
    for r in ops:
        lines.append(
            f"{r['phase']:10s} {r['op'][:42]:42s} {r['launches']:8d} "
            f"{_fmt_bytes(r['dram_bytes']):>10s} {_fmt_bytes(r['issued_bytes']):>10s} "
            f"{r['flops'] / 1e9:9.1f} {r['est_ms']:8.3f}"
        )
    lines.append(
        f"{'total':10s} {'':42s} {t['launches']:8d} {_fmt_bytes(t['dram_bytes']):>10s} "
        f"{_fmt_bytes(t['issued_bytes']):>10s} {t['flops'] / 1e9:9.1f} {t['est_ms']:8.3f}"
    )
    if a["missing_formulas"]:
        lines.append(f"no cost formula (all tensor args counted once): {a['missing_formulas']}")
    return "\n".join(lines)


def format_compare(a: dict, b: dict) -> str:
    """Two reports of the same step side by side, per op (phase + op name), e.g. reference vs
    triton; ops only one of them runs show '-' for the other."""
    rows: dict = {}
    for side, rep in ((0, a), (1, b)):
        for r in rep["ops"]:
            rows.setdefault((r["phase"], r["op"]), [None, None])[side] = r
    order = sorted(
        rows,
        key=lambda k: (_PHASES.index(k[0]), -max((r["est_ms"] for r in rows[k] if r), default=0)),
    )
    na, nb = a["backend"], b["backend"]
    lines = [
        f"ESTIMATES (no GPU was used): {a['model']} B={a['batch']} amp={a['amp']}, {a['step']}, "
        f"on a modelled {a['assumptions']['gpu']}: {na} vs {nb}",
        f"{'phase':9s} {'op':40s} | {'launches':>8s} {'DRAM':>9s} {'ms':>7s} | {'launches':>8s} "
        f"{'DRAM':>9s} {'ms':>7s}",
    ]
    cell = lambda r: (
        f"{r['launches']:8d} {_fmt_bytes(r['dram_bytes']):>9s} {r['est_ms']:7.2f}"
        if r
        else f"{'-':>8s} {'-':>9s} {'-':>7s}"
    )
    for k in order:
        ra, rb = rows[k]
        lines.append(f"{k[0]:9s} {k[1][:40]:40s} | {cell(ra)} | {cell(rb)}")
    ta, tb = a["totals"], b["totals"]
    lines.append(f"{'total':9s} {'':40s} | {cell(ta)} | {cell(tb)}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="registered name or a config .json")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--amp", choices=sorted(_AMP), default="bf16")
    p.add_argument("--backend", default="reference")
    p.add_argument("--inference", action="store_true", help="one forward instead of a step")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--top", type=int, default=0, help="print only the N most expensive rows")
    p.add_argument("--compare", metavar="BACKEND", help="a second backend's ledger, side by side")


def main(args) -> int:
    step = dict(batch=args.batch, amp=args.amp, inference=args.inference, gpu=args.gpu)
    report = ledger(args.model, backend=args.backend, **step)
    print(format_table(report, args.top))
    out = report
    if args.compare:
        other = ledger(args.model, backend=args.compare, **step)
        print("\n" + format_compare(report, other))
        out = {"reports": [report, other]}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
