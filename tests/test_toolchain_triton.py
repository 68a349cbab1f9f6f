"""Toolchain tier, Triton half: every Triton kernel compiles for sm_90 with every config it can
choose, within shared memory, with zero register spills, and the GPU registration path
(`triton_op` + `wrap_triton`) traces under torch.compile with fake CUDA tensors.

`pytest -m toolchain` in an environment with a CUDA-enabled torch (no GPU needed; `.ci/run` makes
one). Both tests run their work in a subprocess without TRITON_INTERPRET: the test process runs
Triton's CPU interpreter (tests/conftest.py), which accepts code the GPU compiler rejects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SMEM_LIMIT = 227 * 1024  # sm_90: opt-in shared memory per block

pytestmark = [
    pytest.mark.toolchain,
    pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA-enabled torch build"),
]


def _run(args: list[str], timeout: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # fresh: a cached kernel would skip the front end's checks
        proc = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
        )
    if proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed:\n{proc.stderr[-6000:]}")
    return proc.stdout


def _package_kernels() -> set[str]:
    """Names of every @triton.jit kernel (`*_kernel`) in the Triton backend's modules."""
    from triton.runtime import JITFunction
    from triton.runtime.interpreter import InterpretedFunction  # what @triton.jit is here

    from crossvit_fast.ops import triton as backend

    names = set()
    for mod_name in (*backend._KERNEL_MODULES, "gemm", "utils"):  # + the shared modules
        mod = __import__(f"{backend.__name__}.{mod_name}", fromlist=["_"])
        for name, obj in vars(mod).items():
            if isinstance(obj, (JITFunction, InterpretedFunction)) and name.endswith("_kernel"):
                names.add(name)
    assert names, "found no Triton kernels: the discovery is broken"
    return names


def _autotuned() -> dict:
    """kernel name -> every config its autotuner holds."""
    from triton.runtime.autotuner import Autotuner

    from crossvit_fast.ops.triton import gemm, patch_embed

    tuned = {}
    for mod in (gemm, patch_embed):
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                tuned[obj.fn.__name__] = obj.configs
    return tuned


def _config_key(cfg) -> str:
    tiles = {k: v for k, v in cfg.all_kwargs().items() if k.startswith("BLOCK") or k == "GROUP_M"}
    tiles.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return json.dumps(tiles, sort_keys=True)


def test_every_triton_kernel_compiles_for_sm90_without_spills():
    report = json.loads(_run([str(HERE / "sm90_compile.py")], timeout=2400))
    assert not report["errors"], f"compiling for sm_90 failed: {report['errors']}"
    kernels = report["kernels"]
    table: dict = {}  # (kernel, dtypes) -> [variants, max regs, max spills, max shared]
    for k in kernels:
        row = table.setdefault((k["kernel"], k["variant"].split(" ")[0]), [0, 0, 0, 0])
        row[0] += 1
        row[1:] = [max(row[1], k["regs"]), max(row[2], k["spills"]), max(row[3], k["shared"])]
    print(f"\nsm_90, Triton {report['triton']}: {len(kernels)} compiled variants (max per kernel)")
    for (name, dts), (n, regs, spills, shared) in sorted(table.items()):
        print(f"  {name:32s} {dts:17s} x{n:<3d} regs {regs:3d} spills {spills} B shared {shared} B")

    # every kernel of the package was launched by the model and compiled (none escapes the tier)
    assert {k["kernel"] for k in kernels} == _package_kernels()
    # every config of every autotuner was compiled, not only the one it would pick first
    # (a compiled config may hold more tile sizes than the autotune config: the resident GEMM's
    # BLOCK_K is the launcher's, K padded to a power of two)
    for name, configs in _autotuned().items():
        seen = [json.loads(k["config"]) for k in kernels if k["kernel"] == name]
        wanted = [json.loads(_config_key(c)) for c in configs]
        missing = [w for w in wanted if not any(w.items() <= s.items() for s in seen)]
        assert not missing, f"{name}: configs never compiled: {missing}"
    bad = [k for k in kernels if k["spills"] or k["local"] or k["shared"] > SMEM_LIMIT]
    assert not bad, "spills or shared memory over the sm_90 limit:\n" + "\n".join(
        f"{k['kernel']} {k['variant']} {k['config']}: regs {k['regs']}, stack {k['stack']} B, "
        f"spills {k['spills']} B, shared {k['shared']} B"
        for k in bad
    )
    gemms = ("_fused_linear_kernel", "_resident_linear_kernel", "_patch_embed_fwd_kernel",
             "_patch_embed_bwd_kernel")  # fmt: skip
    for k in kernels:
        if k["kernel"] in gemms and k["variant"].split(" ")[0].startswith(("bfloat16", "float16")):
            assert k["wgmma"], f"{k['kernel']} {k['variant']} {k['config']}: no Hopper wgmma"


def test_compile_traces_the_triton_op_path_with_fake_cuda_tensors():
    out = _run([str(HERE / "fake_cuda_compile.py")], timeout=1200)
    report = json.loads(out.split("FAKE_CUDA", 1)[1])
    assert not report["errors"], report["errors"]
    # the forward graph holds the kernels themselves: torch.compile traced into the triton_ops
    for case in ("inference/fp32", "inference/bf16-autocast"):
        assert report["graphs"][case] == 1, f"{case}: graph breaks ({report['graphs'][case]})"
        assert report["kernels"][case] > 10, report
    for op, n in report["backward_ops"].items():
        assert n >= 1, f"{op}: no Triton kernel traced in the backward op's body"
