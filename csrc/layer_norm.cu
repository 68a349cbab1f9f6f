// LayerNorm over the last dim, forward and backward, with two fusions used by the functionals:
//
//   forward:  s = x + residual (optional, rounded to x's dtype: the tensor the reference holds)
//             y = LN(s) * w + b,  then GELU(y) when `gelu` (CrossViT's projs: LN -> GELU -> Linear)
//             the store casts to the output dtype (autocast: fp32 LN feeding a bf16 GEMM).
//   backward: dx = LN'(dy * GELU'(y)) and the dw / db partial sums, one pass over dy and s.
//
// Layout: a group of `lanes` threads (one warp, or up to 8 warps for wide rows) owns a row; each
// thread holds its columns in registers (kChunks chunks of VEC contiguous columns, C <= 8192), so the row is
// read from memory once and the variance is a second pass over registers (two-pass, no
// E[x^2] - E[x]^2 cancellation). VEC = 8 uses 16-byte loads (rows 16-byte aligned, C % 8 == 0);
// VEC = 1 is the scalar fallback. dw / db: per-thread register accumulators over the rows the
// block visits, reduced across the block's groups in a fixed order into one partial row per
// block; the host sums the partials (deterministic).
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace cvf {

// Registers per thread for a row: kChunks<VEC> chunks of VEC columns (32 values either way).
template <int VEC>
constexpr int kChunks = VEC == 8 ? 4 : 32;
constexpr int kBlock = 256;  // threads per block; a row group is 32..256 of them

// This thread's columns of the LayerNorm affine (w = 1, b = 0 where absent; 0 past C), read once
// per block: Args is LnFwdArgs or LnBwdArgs (fields w, w_dt, b, b_dt, C).
template <int VEC, typename Args>
__device__ __forceinline__ void load_affine(const Args& a, int lanes, int li,
                                            float (&w)[kChunks<VEC>][VEC],
                                            float (&b)[kChunks<VEC>][VEC]) {
#pragma unroll
  for (int i = 0; i < kChunks<VEC>; ++i)
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int c = (i * lanes + li) * VEC + k;
      w[i][k] = c < a.C ? load_param_or(a.w, a.w_dt, c, 1.f) : 0.f;
      b[i][k] = c < a.C ? load_param_or(a.b, a.b_dt, c, 0.f) : 0.f;
    }
}

// Stores value(i, k) (chunk i, element k of this thread's columns) to the row `out`, VEC at a
// time: the output pass of both kernels (inlined, so the register arrays it reads stay registers).
template <int VEC, typename T, typename F>
__device__ __forceinline__ void store_row(T* out, int C, int lanes, int li, F value) {
#pragma unroll
  for (int i = 0; i < kChunks<VEC>; ++i) {
    const int c0 = (i * lanes + li) * VEC;
    if (c0 < C) {
      float o[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = value(i, k);
      store_vec<VEC>(out + c0, o);
    }
  }
}

template <typename Tin, typename Tout, int VEC>
__global__ void __launch_bounds__(kBlock) ln_fwd_kernel(LnFwdArgs a) {
  CVF_DYNAMIC_SMEM(float2, ln_red);
  const int lanes = a.lanes, li = threadIdx.x % lanes, group = threadIdx.x / lanes;
  const int gpb = blockDim.x / lanes, C = a.C;
  constexpr int kMaxChunks = kChunks<VEC>;
  float w[kMaxChunks][VEC], b[kMaxChunks][VEC];
  load_affine<VEC>(a, lanes, li, w, b);
  // The trip count is uniform over the block (group_sum2 may synchronise the block).
  for (int64_t base = int64_t(blockIdx.x) * gpb; base < a.rows; base += int64_t(gridDim.x) * gpb) {
    const int64_t row = base + group;
    const bool valid = row < a.rows;
    const Tin* xr = static_cast<const Tin*>(a.x) + row * a.x_rs;
    float v[kMaxChunks][VEC];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxChunks; ++i) {
      const int c0 = (i * lanes + li) * VEC;
      if (valid && c0 < C) {
        load_vec<VEC>(xr + c0, v[i]);
        if (a.res != nullptr) {
          float r[VEC];
          load_vec<VEC>(static_cast<const Tin*>(a.res) + row * a.res_rs + c0, r);
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[i][k] = round_to<Tin>(v[i][k] + r[k]);
          store_vec<VEC>(static_cast<Tin*>(a.sum) + row * C + c0, v[i]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += v[i][k];
    }
    const float mean = group_sum2(make_float2(s, 0.f), lanes, ln_red).x / C;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxChunks; ++i) {
      if ((i * lanes + li) * VEC < C) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sq += (v[i][k] - mean) * (v[i][k] - mean);
      }
    }
    const float rstd = rsqrtf(group_sum2(make_float2(sq, 0.f), lanes, ln_red).x / C + a.eps);
    if (!valid) continue;
    store_row<VEC>(static_cast<Tout*>(a.y) + row * C, C, lanes, li, [&](int i, int k) {
      const float o = (v[i][k] - mean) * rstd * w[i][k] + b[i][k];
      return a.gelu ? gelu_erf(o) : o;
    });
    if (li == 0) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
  }
}


template <typename Tin, typename Tdy, int VEC>
__global__ void __launch_bounds__(kBlock) ln_bwd_kernel(LnBwdArgs a) {
  CVF_DYNAMIC_SMEM(float2, ln_red);
  const int lanes = a.lanes, li = threadIdx.x % lanes, group = threadIdx.x / lanes;
  const int gpb = blockDim.x / lanes, C = a.C;
  constexpr int kMaxChunks = kChunks<VEC>;
  float w[kMaxChunks][VEC], b[kMaxChunks][VEC], dw[kMaxChunks][VEC] = {}, db[kMaxChunks][VEC] = {};
  load_affine<VEC>(a, lanes, li, w, b);
  for (int64_t base = int64_t(blockIdx.x) * gpb; base < a.rows; base += int64_t(gridDim.x) * gpb) {
    const int64_t row = base + group;
    const bool valid = row < a.rows;
    const float mean = valid ? a.mean[row] : 0.f, rstd = valid ? a.rstd[row] : 0.f;
    float xh[kMaxChunks][VEC], g[kMaxChunks][VEC];  // x-hat, and dL/d(LN output) * w
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxChunks; ++i) {
      const int c0 = (i * lanes + li) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) xh[i][k] = g[i][k] = 0.f;
      if (valid && c0 < C) {
        float xv[VEC], d[VEC];
        load_vec<VEC>(static_cast<const Tin*>(a.x) + row * a.x_rs + c0, xv);
        load_vec<VEC>(static_cast<const Tdy*>(a.dy) + row * C + c0, d);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xh[i][k] = (xv[k] - mean) * rstd;
          if (a.gelu) d[k] *= gelu_erf_grad(xh[i][k] * w[i][k] + b[i][k]);
          dw[i][k] += d[k] * xh[i][k];
          db[i][k] += d[k];
          g[i][k] = d[k] * w[i][k];
          c1 += g[i][k];
          c2 += g[i][k] * xh[i][k];
        }
      }
    }
    const float2 cs = group_sum2(make_float2(c1, c2), lanes, ln_red);
    if (!valid) continue;
    const float m1 = cs.x / C, m2 = cs.y / C;
    store_row<VEC>(static_cast<Tin*>(a.dx) + row * C, C, lanes, li, [&](int i, int k) {
      return rstd * (g[i][k] - m1 - xh[i][k] * m2);
    });
  }
  // Block partials of dw and db: groups write their registers to shared memory, then the
  // block sums them in group order (deterministic) and writes one row per block.
  float* buf = reinterpret_cast<float*>(ln_red + 32);
  for (int which = 0; which < 2; ++which) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxChunks; ++i)
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int c = (i * lanes + li) * VEC + k;
        if (c < C) buf[group * C + c] = which == 0 ? dw[i][k] : db[i][k];
      }
    __syncthreads();
    float* out = (which == 0 ? a.dw_part : a.db_part) + int64_t(blockIdx.x) * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      float s = 0.f;
      for (int q = 0; q < gpb; ++q) s += buf[q * C + c];
      out[c] = s;
    }
  }
}

namespace {

struct LnPlan {
  int lanes, block;
};

// Smallest group (power of two, 32..256 threads) that holds a row in registers.
LnPlan ln_plan(int64_t C, bool vec8) {
  const int vec = vec8 ? 8 : 1, chunks = vec8 ? kChunks<8> : kChunks<1>;
  int lanes = 32;
  while (lanes < kBlock && ceil_div(C, int64_t(vec) * lanes) > chunks) lanes *= 2;
  if (ceil_div(C, int64_t(vec) * lanes) > chunks) {
    throw std::invalid_argument("layer_norm: C = " + std::to_string(C) +
                                " is wider than the CUDA kernel supports (" +
                                std::to_string(chunks * kBlock * vec) + ")");
  }
  return {lanes, kBlock};
}

}  // namespace

cudaError_t ln_fwd(LnFwdArgs a, cudaStream_t stream) {
  if (a.rows == 0 || a.C == 0) return cudaSuccess;
  const LnPlan p = ln_plan(a.C, a.vec8);
  a.lanes = p.lanes;
  const int gpb = p.block / p.lanes;
  const int64_t grid = cmin<int64_t>(ceil_div(a.rows, gpb), int64_t(num_sms()) * (2048 / p.block));
  const int smem = 32 * sizeof(float2);
  return dispatch_io(a.in_dt, a.out_dt, [&](auto ti, auto to) -> cudaError_t {
    using TI = decltype(ti);
    using TO = decltype(to);
    if (a.vec8) {
      CVF_LAUNCH((ln_fwd_kernel<TI, TO, 8>), dim3(grid), dim3(p.block), smem, stream, a);
    } else {
      CVF_LAUNCH((ln_fwd_kernel<TI, TO, 1>), dim3(grid), dim3(p.block), smem, stream, a);
    }
    return cudaSuccess;
  });
}

int64_t ln_bwd_grid(int64_t rows, int C, bool vec8) {
  const LnPlan p = ln_plan(C, vec8);
  return cmax<int64_t>(1, cmin<int64_t>(ceil_div(rows, p.block / p.lanes), int64_t(num_sms()) * 4));
}

cudaError_t ln_bwd(LnBwdArgs a, cudaStream_t stream) {
  if (a.rows == 0 || a.C == 0) return cudaSuccess;
  const LnPlan p = ln_plan(a.C, a.vec8);
  a.lanes = p.lanes;
  const int gpb = p.block / p.lanes;
  const int64_t grid = ln_bwd_grid(a.rows, a.C, a.vec8);
  const int smem = int(32 * sizeof(float2) + sizeof(float) * gpb * a.C);
  return dispatch_io(a.in_dt, a.dy_dt, [&](auto ti, auto td) -> cudaError_t {
    using TI = decltype(ti);
    using TD = decltype(td);
    if (a.vec8) {
      CVF_TRY(allow_smem(ln_bwd_kernel<TI, TD, 8>, smem));
      CVF_LAUNCH((ln_bwd_kernel<TI, TD, 8>), dim3(grid), dim3(p.block), smem, stream, a);
    } else {
      CVF_TRY(allow_smem(ln_bwd_kernel<TI, TD, 1>, smem));
      CVF_LAUNCH((ln_bwd_kernel<TI, TD, 1>), dim3(grid), dim3(p.block), smem, stream, a);
    }
    return cudaSuccess;
  });
}

}  // namespace cvf
