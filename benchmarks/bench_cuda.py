"""CUDA C++ backend vs Triton vs the reference, per op, at CrossViT's shapes
(docs/architecture.md, registered variants: widths 128/256 .. 384/768, 197 / 401 tokens, batch 64 / 256).

`pytest benchmarks/bench_cuda.py --benchmark-only` on a GPU (skips without one, and without a
built, loadable `crossvit_fast._C`, naming why). Each case times, in one run, the reference eager,
the reference under torch.compile, the Triton op (when the triton backend has it) and the CUDA
op, forward and forward + backward, with CUDA events after warm-up (harness.time_ms). The rows
(median / p20 / p80, ratios to the reference eager and compiled, GB/s from an explicit byte
count) go into the benchmark's extra_info, and through harness.record into the file
CROSSVIT_BENCH_RESULTS names when set; pytest-benchmark's own statistics time the CUDA op alone,
over its own rounds. Goal: the CUDA fusion block at least matches the Triton one.
"""

from __future__ import annotations

import harness
import pytest
import torch

from crossvit_fast import backends
from crossvit_fast.ops import reference as R

DTYPE = torch.bfloat16
BATCHES = (64, 256)
# (name, C of the attended branch, heads, token rows 1 + N, C of the CLS branch)
FUSIONS = [
    ("9_240 fusion[0]", 256, 4, 197, 128),
    ("9_240 fusion[1]", 128, 4, 401, 256),
    ("18_240 fusion[0]", 448, 7, 197, 224),
    ("18_240 fusion[1]", 224, 7, 401, 448),
    ("base_240 fusion[0]", 768, 12, 197, 384),
    ("base_240 fusion[1]", 384, 12, 401, 768),
]


def _impls(op: str) -> dict:
    ref = getattr(R, op)
    out = {
        "reference": ref,
        "reference_compiled": torch.compile(ref, fullgraph=True, dynamic=False),
    }
    for name in ("triton", "cuda"):
        try:
            ops = backends.resolve(name, "cuda")
        except RuntimeError:
            continue
        if ops.sources[op] == name:
            out[name] = ops.impls[op]
    # the cases list an op's parameters flat (the leaves the backward differentiates)
    return {name: backends.flat_args(op, fn) for name, fn in out.items()}


def _run(benchmark, bench: str, op: str, case: dict, make_args, nbytes: int, backward: bool):
    ok, why = backends.backend_availability("cuda", "cuda")
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")
    rows, steps = {}, {}
    for name, fn in _impls(op).items():
        args = make_args()
        params = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

        def step(fn=fn, args=args, params=params):
            out = fn(*args)
            if backward:
                torch.autograd.grad(out, params, torch.ones_like(out))

        steps[name] = step
        t = harness.time_ms(step, "cuda")
        gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
        peak = harness.device_peaks().get("hbm_gbs")
        rows[name] = {
            "op": op,
            "impl": name,
            "backward": backward,
            "dtype": str(DTYPE),
            **case,
            **t,
            "gb_per_s": gbs,
            "pct_hbm_peak": 100 * gbs / peak if peak else None,
        }
    for row in rows.values():
        row["vs_reference"] = rows["reference"]["median_ms"] / row["median_ms"]
        row["vs_compiled"] = rows["reference_compiled"]["median_ms"] / row["median_ms"]
        harness.record(bench, row)
    benchmark.extra_info.update(
        {
            f"{n}_{k}": r[k]
            for n, r in rows.items()
            for k in ("median_ms", "gb_per_s", "vs_reference", "vs_compiled")
        }
    )
    # pytest-benchmark's statistics: the CUDA op alone, synchronised, after the warm-up above
    benchmark.pedantic(lambda: (steps["cuda"](), torch.cuda.synchronize()), rounds=20, iterations=1)


def _xattn_args(B, C, H, N1, grad):
    dev = "cuda"

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(DTYPE).requires_grad_(grad)

    lin = []
    for _ in range(4):
        lin += [p(C, C, scale=C**-0.5), p(C, scale=0.02)]
    return [p(B, C), p(B, N1, C), p(C), p(C), *lin, H, 1e-6]


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("name,C,H,N1,_Ci", FUSIONS)
def test_bench_cross_attention(benchmark, name, C, H, N1, _Ci, B, backward):
    # Bytes: the token tensor read once (forward), read twice + written once (backward).
    nbytes = B * N1 * C * DTYPE.itemsize * (3 if backward else 1)
    case = {"case": name, "B": B, "C": C, "heads": H, "rows": N1}
    _run(
        benchmark,
        "cross_attention",
        "cross_attention",
        case,
        lambda: _xattn_args(B, C, H, N1, backward),
        nbytes,
        backward,
    )


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("name,C,H,N1,Ci", FUSIONS)
def test_bench_cross_fusion(benchmark, name, C, H, N1, Ci, B):
    dev = "cuda"

    def make():
        def p(*shape, scale=1.0):
            return (torch.randn(*shape, device=dev) * scale).to(DTYPE)

        flat = [
            p(Ci),
            p(Ci),
            p(C, Ci, scale=Ci**-0.5),
            p(C),
            *_xattn_args(B, C, H, N1, False)[2:12],
            p(C),
            p(C),
            p(Ci, C, scale=C**-0.5),
            p(Ci),
        ]
        return [p(B, Ci), p(B, N1, C), *flat, H, 1e-6]

    nbytes = B * N1 * C * DTYPE.itemsize
    case = {"case": name, "B": B, "C": C, "heads": H, "rows": N1}
    _run(benchmark, "cross_fusion", "cross_fusion", case, make, nbytes, False)


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("C,N", [(128, 401), (256, 197), (384, 401), (768, 197)])
def test_bench_layer_norm(benchmark, C, N, B, backward):
    def make():
        x = torch.randn(B, N, C, device="cuda", dtype=DTYPE, requires_grad=backward)
        w = torch.ones(C, device="cuda", dtype=DTYPE, requires_grad=backward)
        return [x, w, torch.zeros(C, device="cuda", dtype=DTYPE, requires_grad=backward), 1e-6]

    nbytes = 2 * B * N * C * DTYPE.itemsize * (2 if backward else 1)
    case = {"B": B, "C": C, "rows": N}
    _run(benchmark, "layer_norm", "layer_norm", case, make, nbytes, backward)


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("C,N,ratio", [(128, 401, 3), (256, 197, 3), (384, 401, 4), (768, 197, 4)])
def test_bench_mlp(benchmark, C, N, ratio, B):
    def make():
        def p(*shape, scale=1.0):
            return (torch.randn(*shape, device="cuda") * scale).to(DTYPE).requires_grad_()

        Hd = C * ratio
        return [
            p(B, N, C),
            p(C),
            p(C),
            p(Hd, C, scale=C**-0.5),
            p(Hd),
            p(C, Hd, scale=Hd**-0.5),
            p(C),
            1e-6,
        ]

    # Activations moved (x read, hidden written + read twice, y written), bf16.
    nbytes = B * N * (2 * C + 3 * C * ratio) * DTYPE.itemsize
    case = {"B": B, "C": C, "rows": N, "mlp_ratio": ratio}
    _run(benchmark, "mlp", "mlp", case, make, nbytes, True)


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize(
    "D,img,p", [(128, 240, 12), (256, 224, 16), (384, 240, 12), (768, 224, 16)]
)
def test_bench_patch_embed(benchmark, D, img, p, B):
    def make():
        n = (img // p) ** 2
        return [
            torch.randn(B, 3, img, img, device="cuda", dtype=DTYPE),
            (torch.randn(D, 3, p, p, device="cuda") * 0.02).to(DTYPE),
            torch.zeros(D, device="cuda", dtype=DTYPE),
            torch.zeros(1, 1, D, device="cuda", dtype=DTYPE),
            torch.zeros(1, 1 + n, D, device="cuda", dtype=DTYPE),
        ]

    nbytes = (B * 3 * img * img + 2 * B * (1 + (img // p) ** 2) * D) * DTYPE.itemsize
    case = {"B": B, "D": D, "img": img, "patch": p}
    _run(benchmark, "patch_embed", "patch_embed", case, make, nbytes, False)
