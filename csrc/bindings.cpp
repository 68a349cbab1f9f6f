// Tensor plumbing of the crossvit_fast CUDA extension (module crossvit_fast._C, or the JIT-built
// equivalent): checks the tensors, allocates outputs, sets the device (multi-GPU) and calls the
// torch-free launchers of kernels.h on the current stream of the inputs' device. The
// torch.library custom ops, fake kernels and autograd formulas are in crossvit_fast/ops/cuda/.
//
// The Python functionals raise ValueError for user mistakes before reaching this file; the
// TORCH_CHECKs here guard the C++ entry points themselves.
#include <ATen/ATen.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

#ifdef CVF_EMULATE
// The CPU emulator (csrc/emu, tests only) runs the same kernels on CPU threads over CPU tensors.
#define CVF_CHECK_DEVICE(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor (emulator)")
#define CVF_DEVICE_GUARD(t)
#define CVF_STREAM(t) nullptr
#define CVF_CUDA_OK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated launch failed")
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define CVF_CHECK_DEVICE(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor")
#define CVF_DEVICE_GUARD(t) const c10::cuda::CUDAGuard cvf_guard_((t).device())
#define CVF_STREAM(t) c10::cuda::getCurrentCUDAStream((t).device().index()).stream()
#define CVF_CUDA_OK(expr) C10_CUDA_CHECK(expr)
#endif

namespace {

using c10::optional;

int dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return cvf::kF32;
    case at::kHalf: return cvf::kF16;
    case at::kBFloat16: return cvf::kBF16;
    default: TORCH_CHECK(false, "crossvit_fast CUDA kernels take float32, float16 or bfloat16, got ", s);
  }
  return cvf::kF32;
}

at::ScalarType scalar_type(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 2, "bad dtype code ", code);
  return code == cvf::kF32 ? at::kFloat : (code == cvf::kF16 ? at::kHalf : at::kBFloat16);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// A (rows, C) view whose last dim is contiguous; copies only when no such view exists (the
// kernels take a row stride, so e.g. the strided CLS column y[:, 0] is read in place).
at::Tensor rows_view(const at::Tensor& x) {
  const int64_t C = x.size(-1);
  at::Tensor r = x.dim() == 2 ? x : x.reshape({-1, C});
  if (C > 1 && r.stride(1) != 1) r = r.contiguous();
  if (r.size(0) > 1 && r.stride(0) < C) r = r.contiguous();  // broadcast / overlapping rows
  return r;
}

bool rows_aligned16(const at::Tensor& t2, int64_t C) {
  return C % 8 == 0 && aligned16(t2.data_ptr()) && (t2.stride(0) * t2.element_size()) % 16 == 0;
}

void check_param(const optional<at::Tensor>& p, int64_t n, const at::Tensor& like, const char* name) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->numel() == n && p->is_contiguous(), name, ": expected a contiguous tensor of ", n,
              " elements, got shape ", p->sizes());
  TORCH_CHECK(p->device() == like.device(), name, ": expected a tensor on ", like.device());
  dtype_code(p->scalar_type());
}

const void* ptr(const optional<at::Tensor>& p) { return p.has_value() ? p->data_ptr() : nullptr; }
int code(const optional<at::Tensor>& p) { return p.has_value() ? dtype_code(p->scalar_type()) : cvf::kF32; }

void check_pair(at::ScalarType in, at::ScalarType out) {
  TORCH_CHECK(in == out || in == at::kFloat || out == at::kFloat,
              "unsupported dtype pair ", in, " -> ", out, " (same dtype, or one side float32)");
}

}  // namespace

// y = [GELU](LN(x [+ residual])) -> [y (out dtype), s (x + residual, or empty), mean, rstd (rows,)].
std::vector<at::Tensor> ln_fwd(const at::Tensor& x, const optional<at::Tensor>& residual,
                               const optional<at::Tensor>& weight, const optional<at::Tensor>& bias,
                               double eps, bool gelu, int64_t out_code) {
  CVF_CHECK_DEVICE(x);
  TORCH_CHECK(x.dim() >= 1, "layer_norm: x must have at least one dim");
  const int64_t C = x.size(-1);
  check_param(weight, C, x, "layer_norm weight");
  check_param(bias, C, x, "layer_norm bias");
  const at::ScalarType out_t = scalar_type(out_code);
  check_pair(x.scalar_type(), out_t);
  CVF_DEVICE_GUARD(x);
  const at::Tensor x2 = rows_view(x);
  const int64_t rows = x2.size(0);
  const bool has_res = residual.has_value();
  at::Tensor r2;
  if (has_res) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                "layer_norm: residual must match x in shape, dtype and device");
    r2 = rows_view(*residual);
  }
  auto y = at::empty(x.sizes(), x.options().dtype(out_t));
  auto sum = has_res ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  cvf::LnFwdArgs a{};
  a.x = x2.data_ptr();
  a.x_rs = x2.stride(0);
  a.res = has_res ? r2.data_ptr() : nullptr;
  a.res_rs = has_res ? r2.stride(0) : 0;
  a.y = y.data_ptr();
  a.sum = has_res ? sum.data_ptr() : nullptr;
  a.w = ptr(weight);
  a.w_dt = code(weight);
  a.b = ptr(bias);
  a.b_dt = code(bias);
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.rows = rows;
  a.C = int(C);
  a.eps = float(eps);
  a.gelu = gelu;
  a.in_dt = dtype_code(x.scalar_type());
  a.out_dt = int(out_code);
  a.vec8 = rows_aligned16(x2, C) && aligned16(y.data_ptr()) &&
           (!has_res || (rows_aligned16(r2, C) && aligned16(sum.data_ptr())));
  CVF_CUDA_OK(cvf::ln_fwd(a, CVF_STREAM(x)));
  return {y, sum, mean, rstd};
}

// Backward of ln_fwd -> [dx (x's shape and dtype), dweight (C,) fp32, dbias (C,) fp32].
// x: the normalised input (the sum s when a residual was added).
std::vector<at::Tensor> ln_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& rstd, const optional<at::Tensor>& weight,
                               const optional<at::Tensor>& bias, bool gelu) {
  CVF_CHECK_DEVICE(x);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.device() == x.device(), "layer_norm backward: dy must match x");
  check_pair(x.scalar_type(), dy.scalar_type());
  const int64_t C = x.size(-1);
  check_param(weight, C, x, "layer_norm weight");
  check_param(bias, C, x, "layer_norm bias");
  CVF_DEVICE_GUARD(x);
  const at::Tensor x2 = rows_view(x);
  const at::Tensor dy2 = dy.reshape({-1, C}).contiguous();
  const int64_t rows = x2.size(0);
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat,
              "layer_norm backward: mean / rstd must be fp32 with one value per row");
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  auto dx = at::empty(x.sizes(), x.options());
  auto fopt = x.options().dtype(at::kFloat);
  if (rows == 0 || C == 0) return {dx, at::zeros({C}, fopt), at::zeros({C}, fopt)};
  cvf::LnBwdArgs a{};
  a.vec8 = rows_aligned16(x2, C) && rows_aligned16(dy2, C) && aligned16(dx.data_ptr());
  const int64_t grid = cvf::ln_bwd_grid(rows, int(C), a.vec8);
  auto dw_part = at::empty({grid, C}, fopt), db_part = at::empty({grid, C}, fopt);
  a.dy = dy2.data_ptr();
  a.x = x2.data_ptr();
  a.x_rs = x2.stride(0);
  a.mean = mean_c.data_ptr<float>();
  a.rstd = rstd_c.data_ptr<float>();
  a.w = ptr(weight);
  a.w_dt = code(weight);
  a.b = ptr(bias);
  a.b_dt = code(bias);
  a.dx = dx.data_ptr();
  a.dw_part = dw_part.data_ptr<float>();
  a.db_part = db_part.data_ptr<float>();
  a.rows = rows;
  a.C = int(C);
  a.gelu = gelu;
  a.in_dt = dtype_code(x.scalar_type());
  a.dy_dt = dtype_code(dy.scalar_type());
  CVF_CUDA_OK(cvf::ln_bwd(a, CVF_STREAM(x)));
  return {dx, dw_part.sum(0), db_part.sum(0)};
}

// y = GELU(h + bias); h: (..., C), bias (C,) or None.
at::Tensor bias_gelu_fwd(const at::Tensor& h, const optional<at::Tensor>& bias) {
  CVF_CHECK_DEVICE(h);
  const int64_t C = h.size(-1);
  check_param(bias, C, h, "bias_gelu bias");
  CVF_DEVICE_GUARD(h);
  const at::Tensor h2 = rows_view(h);
  auto y = at::empty(h.sizes(), h.options());
  cvf::BiasGeluArgs a{};
  a.h = h2.data_ptr();
  a.h_rs = h2.stride(0);
  a.bias = ptr(bias);
  a.b_dt = code(bias);
  a.out = y.data_ptr();
  a.rows = h2.size(0);
  a.C = int(C);
  a.dt = dtype_code(h.scalar_type());
  a.vec8 = rows_aligned16(h2, C) && aligned16(y.data_ptr());
  CVF_CUDA_OK(cvf::bias_gelu_fwd(a, CVF_STREAM(h)));
  return y;
}

// Backward -> [dh (h's shape and dtype), dbias (C,) fp32].
std::vector<at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& h,
                                      const optional<at::Tensor>& bias) {
  CVF_CHECK_DEVICE(h);
  TORCH_CHECK(dy.sizes() == h.sizes() && dy.scalar_type() == h.scalar_type(),
              "bias_gelu backward: dy must match h");
  const int64_t C = h.size(-1);
  check_param(bias, C, h, "bias_gelu bias");
  CVF_DEVICE_GUARD(h);
  const at::Tensor h2 = rows_view(h);
  const at::Tensor dy2 = dy.reshape({-1, C}).contiguous();
  auto dh = at::empty(h.sizes(), h.options());
  auto fopt = h.options().dtype(at::kFloat);
  const int64_t rows = h2.size(0);
  if (rows == 0 || C == 0) return {dh, at::zeros({C}, fopt)};
  cvf::BiasGeluArgs a{};
  a.vec8 = rows_aligned16(h2, C) && rows_aligned16(dy2, C) && aligned16(dh.data_ptr());
  auto db_part = at::empty({cvf::bias_gelu_bwd_slices(rows, int(C), a.vec8), C}, fopt);
  a.h = h2.data_ptr();
  a.h_rs = h2.stride(0);
  a.bias = ptr(bias);
  a.b_dt = code(bias);
  a.dy = dy2.data_ptr();
  a.out = dh.data_ptr();
  a.db_part = db_part.data_ptr<float>();
  a.rows = rows;
  a.C = int(C);
  a.dt = dtype_code(h.scalar_type());
  CVF_CUDA_OK(cvf::bias_gelu_bwd(a, CVF_STREAM(h)));
  return {dh, db_part.sum(0)};
}

// feat: (B, N, D), any strides; bias (D,) or None; cls_token D elements; pos_embed (1 + N) * D
// elements -> (B, 1 + N, D) in dtype out_code.
at::Tensor token_assemble(const at::Tensor& feat, const optional<at::Tensor>& bias,
                          const at::Tensor& cls_token, const at::Tensor& pos_embed, int64_t out_code) {
  CVF_CHECK_DEVICE(feat);
  TORCH_CHECK(feat.dim() == 3, "token_assemble: feat must be (B, N, D), got ", feat.sizes());
  const int64_t B = feat.size(0), N = feat.size(1), D = feat.size(2);
  check_param(bias, D, feat, "token_assemble bias");
  check_param(cls_token, D, feat, "token_assemble cls_token");
  check_param(pos_embed, (N + 1) * D, feat, "token_assemble pos_embed");
  const at::ScalarType out_t = scalar_type(out_code);
  check_pair(feat.scalar_type(), out_t);
  CVF_DEVICE_GUARD(feat);
  auto out = at::empty({B, N + 1, D}, feat.options().dtype(out_t));
  cvf::AssembleArgs a{};
  a.feat = feat.data_ptr();
  a.sb = feat.stride(0);
  a.sn = feat.stride(1);
  a.sd = feat.stride(2);
  a.bias = ptr(bias);
  a.bias_dt = code(bias);
  a.cls = cls_token.data_ptr();
  a.cls_dt = dtype_code(cls_token.scalar_type());
  a.pos = pos_embed.data_ptr();
  a.pos_dt = dtype_code(pos_embed.scalar_type());
  a.out = out.data_ptr();
  a.B = B;
  a.N = N;
  a.D = int(D);
  a.in_dt = dtype_code(feat.scalar_type());
  a.out_dt = int(out_code);
  const int64_t es = feat.element_size();
  const bool rows = feat.stride(2) == 1 || D == 1;
  const bool vec8 = rows && D % 8 == 0 && aligned16(feat.data_ptr()) && aligned16(out.data_ptr()) &&
                    (feat.stride(0) * es) % 16 == 0 && (feat.stride(1) * es) % 16 == 0;
  CVF_CUDA_OK(cvf::token_assemble(a, rows, vec8, CVF_STREAM(feat)));
  return out;
}

namespace {

// Row sources of the core: cls (B, C) and tokens (B, N1, C), read in place through their row
// strides; only a non-contiguous last dim forces a copy.
cvf::XaArgs xa_args(const at::Tensor& cls, const at::Tensor& tokens, const optional<at::Tensor>& weight,
                    const optional<at::Tensor>& bias, const at::Tensor& kt, at::Tensor& cv, at::Tensor& tv) {
  CVF_CHECK_DEVICE(cls);
  TORCH_CHECK(cls.dim() == 2 && tokens.dim() == 3 && tokens.size(0) == cls.size(0) &&
                  tokens.size(2) == cls.size(1) && tokens.size(1) >= 1,
              "cross_attention core: expected cls (B, C) and tokens (B, 1 + N, C), got ", cls.sizes(),
              " and ", tokens.sizes());
  TORCH_CHECK(cls.scalar_type() == tokens.scalar_type() && cls.device() == tokens.device(),
              "cross_attention core: cls and tokens must share dtype and device");
  TORCH_CHECK(kt.dim() == 3 && kt.size(0) == cls.size(0) && kt.size(2) == cls.size(1) &&
                  kt.scalar_type() == at::kFloat && kt.is_contiguous() && kt.device() == cls.device(),
              "cross_attention core: kt must be contiguous fp32 (B, H, C), got ", kt.sizes());
  const int64_t C = cls.size(1);
  check_param(weight, C, cls, "cross_attention norm weight");
  check_param(bias, C, cls, "cross_attention norm bias");
  cv = cls.stride(1) == 1 || C == 1 ? cls : cls.contiguous();
  tv = tokens.stride(2) == 1 || C == 1 ? tokens : tokens.contiguous();
  cvf::XaArgs a{};
  a.cls = cv.data_ptr();
  a.cls_sb = cv.stride(0);
  a.tok = tv.data_ptr();
  a.tok_sb = tv.stride(0);
  a.tok_sn = tv.stride(1);
  a.w = ptr(weight);
  a.w_dt = code(weight);
  a.b = ptr(bias);
  a.b_dt = code(bias);
  a.kt = kt.data_ptr<float>();
  a.B = cls.size(0);
  a.N1 = tokens.size(1);
  a.C = int(C);
  a.H = int(kt.size(1));
  a.dt = dtype_code(cls.scalar_type());
  const int64_t es = cls.element_size();
  a.async16 = (C * es) % 16 == 0 && aligned16(a.cls) && aligned16(a.tok) && (a.cls_sb * es) % 16 == 0 &&
              (a.tok_sb * es) % 16 == 0 && (a.tok_sn * es) % 16 == 0;
  return a;
}

}  // namespace

// Forward core -> [u (B, H, C), lse (B, H), mean (B, 1 + N), rstd (B, 1 + N)], all fp32.
std::vector<at::Tensor> xattn_fwd(const at::Tensor& cls, const at::Tensor& tokens,
                                  const optional<at::Tensor>& weight, const optional<at::Tensor>& bias,
                                  const at::Tensor& kt, double scale, double eps) {
  CVF_DEVICE_GUARD(cls);
  at::Tensor cv, tv;
  cvf::XaArgs a = xa_args(cls, tokens, weight, bias, kt, cv, tv);
  auto fopt = cls.options().dtype(at::kFloat);
  auto u = at::empty({a.B, a.H, a.C}, fopt);
  auto lse = at::empty({a.B, a.H}, fopt);
  auto mean = at::empty({a.B, a.N1}, fopt), rstd = at::empty({a.B, a.N1}, fopt);
  if (a.B == 0 || a.C == 0 || a.H == 0) return {u, lse, mean, rstd};
  a.scale = float(scale);
  a.eps = float(eps);
  a.u = u.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  cvf::xattn_plan(a, false);
  at::Tensor part_w, part_ml;
  if (a.S > 1) {  // row splits: partial (w, m, l) merged by a second kernel
    part_w = at::empty({a.S, a.B, a.H, a.C}, fopt);
    part_ml = at::empty({a.S, a.B, a.H, 2}, fopt);
    a.part_w = part_w.data_ptr<float>();
    a.part_ml = part_ml.data_ptr<float>();
  }
  CVF_CUDA_OK(cvf::xattn_fwd(a, CVF_STREAM(cls)));
  return {u, lse, mean, rstd};
}

// Backward core -> [dcls (B, C), dtokens (B, 1 + N, C) (row 0 zero), dkt (B, H, C) fp32,
// dweight (C,) fp32, dbias (C,) fp32]. du: the gradient of u; the rest as saved by xattn_fwd.
std::vector<at::Tensor> xattn_bwd(const at::Tensor& du, const at::Tensor& cls, const at::Tensor& tokens,
                                  const optional<at::Tensor>& weight, const optional<at::Tensor>& bias,
                                  const at::Tensor& kt, const at::Tensor& u, const at::Tensor& lse,
                                  const at::Tensor& mean, const at::Tensor& rstd, double scale) {
  CVF_DEVICE_GUARD(cls);
  const at::Tensor ktc = kt.contiguous();
  at::Tensor cv, tv;
  cvf::XaArgs a = xa_args(cls, tokens, weight, bias, ktc, cv, tv);
  for (const at::Tensor* t : {&du, &u}) {
    TORCH_CHECK(t->sizes() == kt.sizes() && t->scalar_type() == at::kFloat && t->device() == cls.device(),
                "cross_attention backward: du and u must be fp32 (B, H, C) like kt");
  }
  TORCH_CHECK(mean.numel() == a.B * a.N1 && rstd.numel() == a.B * a.N1 && lse.numel() == a.B * a.H,
              "cross_attention backward: saved statistics have the wrong size");
  auto fopt = cls.options().dtype(at::kFloat);
  auto dcls = at::empty({a.B, a.C}, cls.options());
  auto dtok = at::empty({a.B, a.N1, a.C}, cls.options());
  if (a.B == 0 || a.C == 0 || a.H == 0) {
    return {dcls.zero_(), dtok.zero_(), at::zeros({a.B, a.H, a.C}, fopt), at::zeros({a.C}, fopt),
            at::zeros({a.C}, fopt)};
  }
  const at::Tensor duc = du.contiguous(), uc = u.contiguous();
  const at::Tensor lsec = lse.contiguous(), meanc = mean.contiguous(), rstdc = rstd.contiguous();
  // Per-(sample, head) scalars (B * H * C work, tiny): du.u, du.beta, sum(gamma du), sum(gamma kt).
  const at::Tensor gam = weight.has_value() ? weight->to(at::kFloat) : at::ones({a.C}, fopt);
  const at::Tensor bet = bias.has_value() ? bias->to(at::kFloat) : at::zeros({a.C}, fopt);
  const at::Tensor dvec = at::stack({(duc * uc).sum(-1), (duc * bet).sum(-1)}, -1).contiguous();
  const at::Tensor gsum = at::stack({(duc * gam).sum(-1), (ktc * gam).sum(-1)}, -1).contiguous();
  a.scale = float(scale);
  a.mean = meanc.data_ptr<float>();
  a.rstd = rstdc.data_ptr<float>();
  a.du = duc.data_ptr<float>();
  a.dvec = dvec.data_ptr<float>();
  a.lse_in = lsec.data_ptr<float>();
  cvf::xattn_plan(a, true);
  auto coef = at::empty({a.B, a.N1, a.H, 3}, fopt);
  auto dkt_part = at::empty({a.S, a.B, a.H, a.C}, fopt);
  a.coef = coef.data_ptr<float>();
  a.dkt = dkt_part.data_ptr<float>();
  auto stream = CVF_STREAM(cls);
  CVF_CUDA_OK(cvf::xattn_bwd(a, stream));
  const int64_t grid = cvf::xattn_dx_grid(a.B, a.N1);
  auto dw_part = at::empty({grid, a.C}, fopt), db_part = at::empty({grid, a.C}, fopt);
  cvf::XdArgs d{};
  d.cls = a.cls;
  d.cls_sb = a.cls_sb;
  d.tok = a.tok;
  d.tok_sb = a.tok_sb;
  d.tok_sn = a.tok_sn;
  d.w = a.w;
  d.w_dt = a.w_dt;
  d.mean = a.mean;
  d.rstd = a.rstd;
  d.coef = a.coef;
  d.gsum = gsum.data_ptr<float>();
  d.du = a.du;
  d.kt = a.kt;
  d.dcls = dcls.data_ptr();
  d.dtok = dtok.data_ptr();
  d.dw_part = dw_part.data_ptr<float>();
  d.db_part = db_part.data_ptr<float>();
  d.B = a.B;
  d.N1 = a.N1;
  d.C = a.C;
  d.H = a.H;
  d.dt = a.dt;
  CVF_CUDA_OK(cvf::xattn_dx(d, stream));
  return {dcls, dtok, a.S == 1 ? dkt_part[0] : dkt_part.sum(0), dw_part.sum(0), db_part.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "crossvit_fast CUDA kernels (launchers; the ops are in crossvit_fast.ops.cuda.kernels)";
  m.def("ln_fwd", &ln_fwd, "LayerNorm [+ residual] [+ GELU] forward");
  m.def("ln_bwd", &ln_bwd, "LayerNorm [+ GELU] backward");
  m.def("bias_gelu_fwd", &bias_gelu_fwd, "bias + erf-GELU forward");
  m.def("bias_gelu_bwd", &bias_gelu_bwd, "bias + erf-GELU backward");
  m.def("token_assemble", &token_assemble, "patch tokens + bias + CLS + position embedding");
  m.def("xattn_fwd", &xattn_fwd, "K/V-free CLS cross-attention core, forward");
  m.def("xattn_bwd", &xattn_bwd, "K/V-free CLS cross-attention core, backward");
#ifdef CVF_EMULATE
  m.attr("emulated") = true;
#else
  m.attr("emulated") = false;
#endif
}
