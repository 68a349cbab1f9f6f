"""GPU tier of the CUDA C++ backend: every op of `crossvit_fast.ops.cuda` against the reference
(flash-attention's 2x rule, output and every gradient, fp32 / fp16 / bf16) and against the Triton
op where the triton backend has one; registration (opcheck, torch.compile fullgraph); autocast
output dtypes; the whole model with backend="cuda" on the timm golden vectors.

Needs a CUDA GPU (`gpu` marker). The same `check_*` helpers run on CPU through the kernel
emulator in tests/test_cuda_build.py, which is how they are exercised on machines without one;
the per-op tests (tests/ops) run the `cuda` backend through that emulator as well.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast import backends
from crossvit_fast.backends import flat_args
from crossvit_fast.ops import cuda as cuda_backend
from crossvit_fast.ops import reference as R
from crossvit_fast.ops.cuda import functional as CF
from crossvit_fast.ops.cuda import kernels

from . import golden
from .numerics import FLOOR, assert_2x_rule, max_err

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-6


# -- shared checks (device: "cuda", or "cpu" with the emulated extension installed) ------------


def check_op(op: str, args: list, diff: list[int], skip_grad: tuple[int, ...] = (), triton=None):
    """Run the cuda op and the reference (in the args' dtype and in float64) on `args`; check
    the output and the gradients of args[i] for i in diff. Returns the cuda output."""
    # `args` lists the parameters flat; the ops take them grouped
    cuda_fn, ref_fn = flat_args(op, CF.OPS[op]), flat_args(op, getattr(R, op))
    triton = flat_args(op, triton) if triton is not None else None

    def leaves(dtype=None):
        out = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                a = a.detach().to(dtype) if dtype is not None else a.detach().clone()
                a.requires_grad_(i in diff)
            out.append(a)
        return out

    ours_args, torch_args, args64 = leaves(), leaves(), leaves(torch.float64)
    ours = cuda_fn(*ours_args)
    torch_out = ref_fn(*torch_args)
    ref64 = ref_fn(*args64)
    assert ours.dtype == torch_out.dtype, f"{op}: dtype {ours.dtype} != reference {torch_out.dtype}"
    assert_2x_rule(ours, torch_out, ref64, f"{op} output")
    if triton is not None:
        tri = triton(*leaves())
        assert_2x_rule(tri, torch_out, ref64, f"triton {op} output")
        e = max_err(ours, tri)
        assert (
            e
            <= 2 * max_err(torch_out, ref64)
            + 2 * FLOOR[ours.dtype] * ref64.abs().max().item()
            + 1e-30
        ), f"{op}: cuda and triton differ by {e:.3e}"
    if not diff or ours.numel() == 0:
        return ours
    g = torch.randn_like(ref64)
    grads = [
        torch.autograd.grad(o, [a[i] for i in diff], g.to(o.dtype), allow_unused=True)
        for o, a in ((ours, ours_args), (torch_out, torch_args), (ref64, args64))
    ]
    gscale = max(
        (r.abs().max().item() for r in grads[2] if r is not None and r.numel()), default=0.0
    )
    for k, i in enumerate(diff):
        go, gt, gr = (gs[k] for gs in grads)
        if i in skip_grad:  # exactly zero in exact arithmetic (key bias): ours is exactly zero
            assert go is not None and go.abs().max().item() == 0.0, (
                f"{op} grad of arg {i} must be exactly 0"
            )
            continue
        assert go is not None, f"{op}: no gradient for arg {i}"
        # the floor relative to the op's largest gradient, as in tests/ops (tests/numerics.py)
        assert_2x_rule(go, gt, gr, f"{op} grad of arg {i}", scale=gscale)
    return ours


def rnd(*shape, device, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype)


def linear_params(n_out, n_in, device, dtype, bias=True):
    w = rnd(n_out, n_in, device=device, dtype=dtype, scale=n_in**-0.5)
    return w, (rnd(n_out, device=device, dtype=dtype, scale=0.1) if bias else None)


def check_layer_norm(device, dtype, shape, noncontig=False, affine=True):
    C = shape[-1]
    x = rnd(*shape, device=device, dtype=dtype, scale=2.0, shift=0.5)
    if noncontig:  # a transposed view: rows are not contiguous, the last dim is strided
        x = rnd(*shape[:-2], C, shape[-2], device=device, dtype=dtype).transpose(-1, -2)
    w = rnd(C, device=device, dtype=dtype, shift=1.0) if affine else None
    b = rnd(C, device=device, dtype=dtype) if affine else None
    return check_op("layer_norm", [x, w, b, EPS], [0, 1, 2] if affine else [0])


def check_mlp(device, dtype, B, N, C, hidden, bias=True):
    x = rnd(B, N, C, device=device, dtype=dtype)
    w1, b1 = linear_params(hidden, C, device, dtype, bias)
    w2, b2 = linear_params(C, hidden, device, dtype, bias)
    nw, nb = rnd(C, device=device, dtype=dtype, shift=1.0), rnd(C, device=device, dtype=dtype)
    return check_op(
        "mlp", [x, nw, nb, w1, b1, w2, b2, EPS], [0, 1, 2, 3, 4, 5, 6] if bias else [0, 1, 2, 3, 5]
    )


def check_self_attention(device, dtype, B, N, C, H):
    x = rnd(B, N, C, device=device, dtype=dtype)
    wqkv, bqkv = linear_params(3 * C, C, device, dtype)
    wp, bp = linear_params(C, C, device, dtype)
    nw, nb = rnd(C, device=device, dtype=dtype, shift=1.0), rnd(C, device=device, dtype=dtype)
    return check_op(
        "self_attention", [x, nw, nb, wqkv, bqkv, wp, bp, H, EPS], [0, 1, 2, 3, 4, 5, 6]
    )


def check_cls_proj(device, dtype, B, C_in, C_out, strided=False):
    x = rnd(B, C_in, device=device, dtype=dtype)
    if strided:  # the CLS column of a token tensor: row stride (1 + N) * C
        x = rnd(B, 5, C_in, device=device, dtype=dtype)[:, 0]
    w, b = linear_params(C_out, C_in, device, dtype)
    nw, nb = rnd(C_in, device=device, dtype=dtype, shift=1.0), rnd(C_in, device=device, dtype=dtype)
    return check_op("cls_proj", [x, nw, nb, w, b, EPS], [0, 1, 2, 3, 4])


def _xattn_params(C, device, dtype, qkv_bias=True):
    out = []
    for _ in range(4):
        out.extend(linear_params(C, C, device, dtype, qkv_bias or len(out) == 6))
    return out  # wq, bq, wk, bk, wv, bv, proj_w, proj_b


def check_cross_attention(device, dtype, B, N1, C, H, noncontig=False, qkv_bias=True, triton=None):
    cls = rnd(B, C, device=device, dtype=dtype)
    tok = rnd(B, N1, C, device=device, dtype=dtype, scale=2.0, shift=0.5)
    if noncontig:  # rows of a wider buffer: row and batch strides differ from C
        tok = rnd(B, N1 + 2, C + 8, device=device, dtype=dtype, scale=2.0)[:, 1:-1, 4 : 4 + C]
    nw, nb = rnd(C, device=device, dtype=dtype, shift=1.0), rnd(C, device=device, dtype=dtype)
    p = _xattn_params(C, device, dtype, qkv_bias)
    args = [cls, tok, nw, nb, *p, H, EPS]
    diff = [i for i in range(12) if args[i] is not None]
    return check_op(
        "cross_attention", args, diff, skip_grad=(7,) if qkv_bias else (), triton=triton
    )


def check_cross_fusion(device, dtype, B, N1, C_i, C_j, H, triton=None):
    cls = rnd(B, C_i, device=device, dtype=dtype)
    tok = rnd(B, N1, C_j, device=device, dtype=dtype, scale=2.0)
    pn = [rnd(C_i, device=device, dtype=dtype, shift=1.0), rnd(C_i, device=device, dtype=dtype)]
    pw = list(linear_params(C_j, C_i, device, dtype))
    an = [rnd(C_j, device=device, dtype=dtype, shift=1.0), rnd(C_j, device=device, dtype=dtype)]
    att = _xattn_params(C_j, device, dtype)
    rn = [rnd(C_j, device=device, dtype=dtype, shift=1.0), rnd(C_j, device=device, dtype=dtype)]
    rw = list(linear_params(C_i, C_j, device, dtype))
    args = [cls, tok, *pn, *pw, *an, *att, *rn, *rw, H, EPS]
    diff = list(range(20))
    return check_op("cross_fusion", args, diff, skip_grad=(11,), triton=triton)


def check_token_assemble(device, dtype, B, D, h, w, channels_last=False):
    feat = rnd(B, D, h, w, device=device, dtype=dtype)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    cls = rnd(1, 1, D, device=device, dtype=dtype)
    pos = rnd(1, 1 + h * w, D, device=device, dtype=dtype)
    return check_op("token_assemble", [feat, cls, pos], [0, 1, 2])


def check_patch_embed(device, dtype, B, Cin, H, W, p, D, bias=True):
    x = rnd(B, Cin, H, W, device=device, dtype=dtype)
    w = rnd(D, Cin, p, p, device=device, dtype=dtype, scale=(Cin * p * p) ** -0.5)
    b = rnd(D, device=device, dtype=dtype, scale=0.1) if bias else None
    cls = rnd(1, 1, D, device=device, dtype=dtype)
    pos = rnd(1, 1 + (H // p) * (W // p), D, device=device, dtype=dtype)
    return check_op("patch_embed", [x, w, b, cls, pos], [0, 1, 2, 3, 4] if bias else [0, 1, 3, 4])


AUTOCAST_CASES = {
    # op -> (builder of args for (device, dtype), output dtype under bf16 autocast with fp32 inputs)
    "layer_norm": lambda d: [rnd(2, 5, 64, device=d, dtype=torch.float32), None, None, EPS],
    "cls_proj": lambda d: [
        rnd(2, 64, device=d, dtype=torch.float32),
        None,
        None,
        *linear_params(32, 64, d, torch.float32),
        EPS,
    ],
    "mlp": lambda d: [
        rnd(2, 5, 64, device=d, dtype=torch.float32),
        None,
        None,
        *linear_params(128, 64, d, torch.float32),
        *linear_params(64, 128, d, torch.float32),
        EPS,
    ],
    "cross_attention": lambda d: [
        rnd(2, 64, device=d, dtype=torch.float32),
        rnd(2, 9, 64, device=d, dtype=torch.float32),
        None,
        None,
        *_xattn_params(64, d, torch.float32),
        4,
        EPS,
    ],
    "token_assemble": lambda d: [
        rnd(2, 64, 3, 3, device=d, dtype=torch.float32),
        rnd(1, 1, 64, device=d, dtype=torch.float32),
        rnd(1, 10, 64, device=d, dtype=torch.float32),
    ],
    "patch_embed": lambda d: [
        rnd(2, 3, 16, 16, device=d, dtype=torch.float32),
        rnd(64, 3, 8, 8, device=d, dtype=torch.float32),
        rnd(64, device=d, dtype=torch.float32),
        rnd(1, 1, 64, device=d, dtype=torch.float32),
        rnd(1, 5, 64, device=d, dtype=torch.float32),
    ],
}


def check_autocast(device, op, dtype=torch.bfloat16):
    """Under autocast the op returns the reference's dtype, with values close to the reference's."""
    args = AUTOCAST_CASES[op](device)
    with torch.autocast(device, dtype=dtype):
        ours = flat_args(op, CF.OPS[op])(*args)
        ref = flat_args(op, getattr(R, op))(*args)
    assert ours.dtype == ref.dtype, f"{op} under autocast: {ours.dtype} != reference {ref.dtype}"
    tol = 0.05 * ref.float().abs().max().item() + 1e-3
    assert max_err(ours, ref) <= tol, f"{op} under autocast: error {max_err(ours, ref):.3e}"


def check_fake_and_compile(device):
    """opcheck (schema, fake kernel, autograd registration) of every custom op, and a
    torch.compile(fullgraph=True) trace of a fusion step."""
    x = rnd(3, 7, 64, device=device, dtype=torch.float32)
    w, b = rnd(64, device=device, dtype=torch.float32), rnd(64, device=device, dtype=torch.float32)
    r = rnd(3, 7, 64, device=device, dtype=torch.float32)
    torch.library.opcheck(kernels.layer_norm, (x, r, w, b, EPS, True, torch.float32))
    torch.library.opcheck(kernels.bias_gelu, (x, b))
    torch.library.opcheck(
        kernels.token_assemble,
        (x, b, w, rnd(8, 64, device=device, dtype=torch.float32), torch.float32),
    )
    kt = rnd(3, 4, 64, device=device, dtype=torch.float32)
    torch.library.opcheck(kernels.cross_attention_core, (x[:, 0], x, w, b, kt, 0.25, EPS))
    args = [x[:, 0], x, w, b, *_xattn_params(64, device, torch.float32), 4, EPS]
    compiled = torch.compile(
        CF.cross_attention, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor"
    )
    torch.testing.assert_close(
        flat_args("cross_attention", compiled)(*args),
        flat_args("cross_attention", CF.cross_attention)(*args),
        rtol=1e-4,
        atol=1e-5,
    )


def check_golden(case: str, device: str):
    """The whole model with every op from the cuda backend reproduces timm's golden vectors in fp32."""
    g = golden.load(case)
    model = golden.build(g, "reference", torch.float32)
    model.set_backend("cuda")  # on CPU: the emulated extension (a backend of the table there)
    model.to(device)
    assert set(model.opset(device).sources.values()) >= {"cuda"}
    g = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in g.items()}
    g["param_grads"] = {k: v.to(device) for k, v in g["param_grads"].items()}
    err = golden.run(g, model, torch.float32)
    for kind, timm_err in zip(("logits", "input_grad", "param_grads"), golden.TIMM_FP32_ERR[case]):
        assert err[kind] <= max(2 * timm_err, 1e-5), (case, kind, err[kind], timm_err)
    assert err["zero_grads"] <= golden.ZERO_GRAD_NOISE[torch.float32], (case, err)


# -- the GPU tier -------------------------------------------------------------------------------

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ok, why = cuda_backend.availability("cuda")
    assert ok, f"the cuda backend must load on a GPU machine: {why}"


def _triton(op):
    try:
        ops = backends.resolve("triton", "cuda")
    except RuntimeError:
        return None
    return ops.impls[op] if ops.sources[op] == "triton" else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,noncontig",
    [
        ((2, 197, 96), False),
        ((3, 100), False),
        ((0, 5, 64), False),
        ((2, 7, 448), True),
        ((1, 1, 2056), False),
    ],
)  # 100: C % 8 != 0 (scalar path); 0: empty batch; 448: transposed view; 2056: wide rows
def test_layer_norm(dtype, shape, noncontig):
    check_layer_norm(DEV, dtype, shape, noncontig)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,N,C,hidden,bias", [(2, 197, 96, 384, True), (1, 7, 224, 672, False), (0, 5, 64, 128, True)]
)
def test_mlp(dtype, B, N, C, hidden, bias):
    check_mlp(DEV, dtype, B, N, C, hidden, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C,H", [(2, 197, 192, 3), (1, 401, 224, 7), (2, 2, 64, 8)])
def test_self_attention(dtype, B, N, C, H):
    check_self_attention(DEV, dtype, B, N, C, H)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_cls_proj(dtype, strided):
    check_cls_proj(DEV, dtype, 3, 96, 192, strided)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,N1,C,H,noncontig",
    [
        (2, 197, 192, 3, False),  # CrossViT-Ti fusion[0]: d = 64
        (2, 401, 96, 3, False),  # fusion[1]: d = 32, 401 rows (splits)
        (1, 1, 64, 4, False),  # N = 0: the CLS attends to itself only
        (3, 2, 224, 7, True),  # 7 heads, width a multiple of 32 not 64, strided tokens
        (2, 33, 1536, 12, False),  # head dim 128
        (2, 17, 2048, 16, False),  # 16 heads x 128: two head groups per sample
        (2, 9, 100, 4, False),  # C % 8 != 0: unaligned rows, element loads
        (0, 5, 64, 4, False),  # empty batch
        (1, 8192, 96, 3, False),  # the longest sequence
    ],
)
def test_cross_attention(dtype, B, N1, C, H, noncontig):
    check_cross_attention(DEV, dtype, B, N1, C, H, noncontig, triton=_triton("cross_attention"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_attention_no_qkv_bias(dtype):
    check_cross_attention(DEV, dtype, 2, 65, 128, 4, qkv_bias=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,N1,C_i,C_j,H", [(2, 197, 96, 192, 3), (2, 401, 192, 96, 3), (4, 197, 224, 448, 7)]
)
def test_cross_fusion(dtype, B, N1, C_i, C_j, H):
    check_cross_fusion(DEV, dtype, B, N1, C_i, C_j, H, triton=_triton("cross_fusion"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,D,h,w,cl",
    [(2, 96, 20, 20, False), (2, 192, 14, 14, True), (0, 64, 3, 3, False), (1, 60, 5, 7, False)],
)
def test_token_assemble(dtype, B, D, h, w, cl):
    check_token_assemble(DEV, dtype, B, D, h, w, cl)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,H,W,p,D,bias",
    [(2, 240, 240, 12, 96, True), (2, 224, 224, 16, 192, False), (0, 32, 32, 16, 64, True)],
)
def test_patch_embed(dtype, B, H, W, p, D, bias):
    check_patch_embed(DEV, dtype, B, 3, H, W, p, D, bias)


@pytest.mark.parametrize("op", sorted(AUTOCAST_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_dtype(op, dtype):
    check_autocast(DEV, op, dtype)


def test_registration_opcheck_and_compile():
    check_fake_and_compile(DEV)


@pytest.mark.parametrize("case", golden.CASES)
def test_golden_model(case):
    check_golden(case, DEV)


def test_backend_cuda_model_runs_every_op_on_cuda():
    ops = backends.resolve("cuda", "cuda")
    assert set(ops.sources.values()) == {"cuda"}, ops.sources
