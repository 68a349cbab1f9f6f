"""Compile every Triton kernel the model launches for sm_90, with every config it can choose.

Run as a script (not a test module: the test process runs Triton's CPU interpreter, which accepts
code the GPU compiler rejects), by `tests/test_toolchain_triton.py`:

    python tests/sm90_compile.py [--cases w96,...] [--dtypes bf16,...] > report.json

No GPU is needed. The CUDA driver is mocked to report an sm_90 target, and every launch through
`crossvit_fast.ops.triton.utils.launch` (the one launcher, so nothing escapes) becomes a
compile-only `warmup`. An autotuned kernel is compiled once per config its pruning keeps, not only
the first. The real model (`backend="triton"`) then runs forward and backward at CrossViT shapes:
widths 96 ... 768 (each whole-row tile width of the row kernels), tokens 197 / 401, plain and dagger stems, batch 2 and 8 (the split and the single-program
cross-attention plans on the pretend 4-SM device), in bf16, fp16, AMP (fp32 model under bf16
autocast) and fp32. The kernels produce no data here (the torch ops between them run on garbage);
only what gets compiled matters.

Each compiled kernel's cubin is read with cuobjdump (shipped with Triton): registers, stack frame
(ptxas puts spilled registers there; Triton kernels use no local arrays, so any stack is a spill),
and its shared memory; the PTX says whether a GEMM uses Hopper's wgmma. Printed as JSON:
{"kernels": [{"kernel", "variant", "config", "regs", "stack", "local", "spills", "shared",
"wgmma"}, ...],
 "errors": {case: message}, "triton": version}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package


class _Sm90Driver:
    """Just enough of Triton's driver interface to compile for sm_90 without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


_NV_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_CUOBJDUMP = _NV_BIN / "cuobjdump"
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_spills(ptx: str) -> int:
    """Spill stores + loads (bytes) as ptxas -v reports them for this PTX on sm_90a (run only
    for kernels with a stack frame: the cubin's resource table has no spill count)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run(
            [str(_NV_BIN / "ptxas"), "-v", "--gpu-name=sm_90a", str(src), "-o", str(src) + ".o"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return sum(int(a) + int(b) for a, b in _SPILLS.findall(log))


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(_CUOBJDUMP), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    regs, stack, _shared, local = (int(v) for v in _USAGE.search(out).groups())
    return {"regs": regs, "stack": stack, "local": local}


class CompileOnly:
    """Stands in for `wrap_triton(kernel)[grid]`: compiles, records, launches nothing."""

    def __init__(self, report: dict):
        self.report = report

    def __call__(self, kernel):
        return _Launcher(self, kernel)

    def compile(self, kernel, args, meta):
        configs = [None]
        if isinstance(kernel, Autotuner):
            named = dict(zip(kernel.arg_names, args))
            prune = kernel.early_config_prune
            configs = prune(kernel.configs, named, **meta) if prune else kernel.configs
            kernel = kernel.fn
        for cfg in configs:
            full = {**meta, **(cfg.all_kwargs() if cfg is not None else {})}
            ck = kernel.warmup(*args, grid=(1,), **full)
            dtypes = sorted(
                {str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)}
            )
            flags = {k: v for k, v in full.items() if k.isupper() and not k.startswith("BLOCK")}
            tiles = {k: v for k, v in full.items() if k.startswith("BLOCK") or k == "GROUP_M"}
            tiles.update(num_warps=full.get("num_warps", 4), num_stages=full.get("num_stages"))
            key = (kernel.fn.__name__, ck.hash)
            if key in self.report:
                continue
            self.report[key] = {
                "kernel": kernel.fn.__name__,
                "variant": "/".join(dtypes) + " " + json.dumps(flags, sort_keys=True),
                "config": json.dumps(tiles, sort_keys=True),
                "shared": ck.metadata.shared,
                "wgmma": "wgmma" in ck.asm["ptx"],
                **_resources(ck.asm["cubin"]),
            }
            entry = self.report[key]
            entry["spills"] = _ptxas_spills(ck.asm["ptx"]) if entry["stack"] else 0


class _Launcher:
    def __init__(self, owner: CompileOnly, kernel):
        self.owner, self.kernel = owner, kernel

    def __getitem__(self, grid):
        return lambda *args, **meta: self.owner.compile(self.kernel, args, meta)


def _cases():
    """(name, CrossViTConfig kwargs, batch sizes). Widths pick the row kernels' whole-row tiles
    (next power of two: 128 ... 1024); the token pass has one tile plan at every width."""
    both = (2, 8)  # 2 < 4 pretend SMs: split token pass + merge; 8: one program per sample
    shape = dict(img_size=(240, 224), patch_size=(12, 16))  # 401 and 197 tokens
    return [
        # crossvit_tiny: widths 96 / 192, 3 heads
        ("w96", dict(shape, embed_dim=(96, 192), num_heads=(3, 3), mlp_ratio=(4.0, 4.0)), both),
        # crossvit_18 (dagger stem): widths 224 / 448, 7 heads, MLP ratio 3
        (
            "w224_dagger",
            dict(
                shape, embed_dim=(224, 448), num_heads=(7, 7), mlp_ratio=(3.0, 3.0), multi_conv=True
            ),
            both,
        ),
        # crossvit_base: widths 384 / 768, 12 heads
        ("w768", dict(shape, embed_dim=(384, 768), num_heads=(12, 12), mlp_ratio=(4.0, 4.0)), both),
    ]


_DTYPES = {
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "amp": (torch.float32, torch.bfloat16),  # fp32 activations and weights, bf16 GEMMs
    "fp32": (torch.float32, None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated subset of the cases")
    parser.add_argument("--dtypes", default=",".join(_DTYPES), help="comma-separated subset")
    opts = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("sm90_compile: unset TRITON_INTERPRET (this compiles for the GPU)")
    triton.runtime.driver.set_active(_Sm90Driver())

    import crossvit_fast
    from crossvit_fast.ops import triton as triton_backend
    from crossvit_fast.ops.triton import utils

    report: dict = {}
    utils.wrap_triton = CompileOnly(report)  # the one launcher's way to the GPU
    # The kernels compile for a GPU but the tensors stay on the CPU: let the table pick Triton.
    triton_backend.availability = lambda device_type: (True, "sm_90 compile check")
    errors = {}
    chosen = [c for c in _cases() if not opts.cases or c[0] in opts.cases.split(",")]
    for name, kwargs, batches in chosen:
        # Two stages: the first's fusion_stage re-assembles the tokens (the cross-attention
        # backward sums the stage output's gradient in, HAS_DRES), the last's returns CLS rows.
        # The second branch's two blocks in the first stage run as one `blocks` op (the fc2
        # dgrad finishing the next block's LN1 backward, DNORM with the GELU gradient).
        depth = ((1, 2, 0), (1, 1, 0))
        cfg = crossvit_fast.CrossViTConfig(depth=depth, num_classes=10, **kwargs)
        for dt_name in opts.dtypes.split(","):
            dtype, amp = _DTYPES[dt_name]
            model = crossvit_fast.CrossViT(cfg, backend="triton").to(dtype)
            for batch in batches:
                case = f"{name}/{dt_name}/B{batch}"
                try:
                    # the image gradient too: its kernel runs only when the input needs one
                    x = torch.randn(batch, 3, 240, 240, dtype=dtype, requires_grad=True)
                    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                        loss = model(x).float().sum()
                    loss.backward()
                except Exception as exc:  # reported per case: one failure must not hide others
                    errors[case] = "".join(traceback.format_exception(exc))[-3000:]
    print(
        json.dumps(
            {"kernels": list(report.values()), "errors": errors, "triton": triton.__version__}
        )
    )


if __name__ == "__main__":
    main()
