// Bias + erf-GELU epilogue after a cuBLAS GEMM (mlp fc1): y = GELU(h + b), and its backward
// dh = dy * GELU'(h + b) with db = sum over rows of dh fused into the same pass.
//
// The GEMM runs without bias so its output h is the pre-activation minus b; the backward
// recomputes h + b instead of storing it. Both kernels are memory bound: 16-byte vector accesses
// (VEC = 8) when rows are aligned and C % 8 == 0, scalar otherwise. db: each thread owns VEC
// columns of a 32 * VEC column strip and accumulates them over the rows of its warp; the block
// sums its warps in a fixed order and writes one partial row (host sums: deterministic).
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace cvf {


template <typename T, int VEC>
__global__ void __launch_bounds__(256) bias_gelu_fwd_kernel(BiasGeluArgs a) {
  const int nvec = a.C / VEC;
  const int64_t total = a.rows * nvec;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / nvec;
    const int c0 = int(i - row * nvec) * VEC;
    float v[VEC];
    load_vec<VEC>(static_cast<const T*>(a.h) + row * a.h_rs + c0, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = gelu_erf(v[k] + load_param_or(a.bias, a.b_dt, c0 + k, 0.f));
    store_vec<VEC>(static_cast<T*>(a.out) + row * a.C + c0, v);
  }
}

// grid: (column strips of 32 * VEC, row slices); block: 32 lanes x 8 warps.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) bias_gelu_bwd_kernel(BiasGeluArgs a) {
  __shared__ float red[8][32 * VEC];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c0 = (blockIdx.x * 32 + lane) * VEC;
  const bool active = c0 < a.C;
  float bias[VEC], db[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    bias[k] = active ? load_param_or(a.bias, a.b_dt, c0 + k, 0.f) : 0.f;
    db[k] = 0.f;
  }
  if (active) {
    for (int64_t row = int64_t(blockIdx.y) * 8 + warp; row < a.rows; row += int64_t(gridDim.y) * 8) {
      float hv[VEC], d[VEC];
      load_vec<VEC>(static_cast<const T*>(a.h) + row * a.h_rs + c0, hv);
      load_vec<VEC>(static_cast<const T*>(a.dy) + row * a.C + c0, d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        d[k] *= gelu_erf_grad(hv[k] + bias[k]);
        db[k] += round_to<T>(d[k]);  // dh as stored: db is the sum of the stored gradient
      }
      store_vec<VEC>(static_cast<T*>(a.out) + row * a.C + c0, d);
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) red[warp][lane * VEC + k] = db[k];
  __syncthreads();
  for (int j = threadIdx.x; j < 32 * VEC; j += blockDim.x) {
    const int c = blockIdx.x * 32 * VEC + j;
    if (c < a.C) {
      float s = 0.f;
      for (int w = 0; w < 8; ++w) s += red[w][j];
      a.db_part[int64_t(blockIdx.y) * a.C + c] = s;
    }
  }
}

cudaError_t bias_gelu_fwd(BiasGeluArgs a, cudaStream_t stream) {
  if (a.rows == 0 || a.C == 0) return cudaSuccess;
  const int64_t work = a.rows * (a.vec8 ? a.C / 8 : a.C);
  const int64_t grid = cmin<int64_t>(ceil_div(work, 256), int64_t(num_sms()) * 8);
  return dispatch_t(a.dt, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (a.vec8) {
      CVF_LAUNCH((bias_gelu_fwd_kernel<T, 8>), dim3(grid), dim3(256), 0, stream, a);
    } else {
      CVF_LAUNCH((bias_gelu_fwd_kernel<T, 1>), dim3(grid), dim3(256), 0, stream, a);
    }
    return cudaSuccess;
  });
}

// Row slices: enough blocks to fill the GPU, few enough that the partial rows stay small.
int64_t bias_gelu_bwd_slices(int64_t rows, int C, bool vec8) {
  const int64_t strips = ceil_div(C, 32 * (vec8 ? 8 : 1));
  return cmax<int64_t>(1, cmin<int64_t>(ceil_div(rows, 8), ceil_div(int64_t(num_sms()) * 4, strips)));
}

cudaError_t bias_gelu_bwd(BiasGeluArgs a, cudaStream_t stream) {
  if (a.rows == 0 || a.C == 0) return cudaSuccess;
  const int64_t strips = ceil_div(a.C, 32 * (a.vec8 ? 8 : 1));
  const int64_t slices = bias_gelu_bwd_slices(a.rows, a.C, a.vec8);
  return dispatch_t(a.dt, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (a.vec8) {
      CVF_LAUNCH((bias_gelu_bwd_kernel<T, 8>), dim3(strips, slices), dim3(256), 0, stream, a);
    } else {
      CVF_LAUNCH((bias_gelu_bwd_kernel<T, 1>), dim3(strips, slices), dim3(256), 0, stream, a);
    }
    return cudaSuccess;
  });
}

}  // namespace cvf
