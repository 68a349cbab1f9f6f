// Token assembly for the patch embedding: writes the (B, 1 + N, D) token tensor in one pass,
//
//   out[b, 0]     = cls + pos[0]
//   out[b, 1 + n] = feat[b, n] + bias + pos[1 + n]
//
// where feat is either the cuBLAS GEMM output of the patch embedding ((B * N, D), row major:
// `patch_embed`) or the stem's (B, D, h, w) feature map read as (B, N = h * w, D) through its
// strides (`token_assemble`, dagger stem). Two kernels: a row kernel when D is the contiguous
// dim of feat (16-byte vectors when aligned), and a 32 x 32 shared-memory tiled transpose when
// it is not (NCHW conv output: reads coalesced along n, writes coalesced along d).
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace cvf {


template <typename Tin, typename Tout, int VEC>
__global__ void __launch_bounds__(256) assemble_rows_kernel(AssembleArgs a) {
  const int nvec = a.D / VEC;
  const int64_t total = a.B * (a.N + 1) * nvec;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / nvec;  // b * (N + 1) + r
    const int c0 = int(i - row * nvec) * VEC;
    const int64_t b = row / (a.N + 1), r = row - b * (a.N + 1);
    float v[VEC];
    if (r == 0) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = load_param(a.cls, a.cls_dt, c0 + k);
    } else {
      load_vec<VEC>(static_cast<const Tin*>(a.feat) + b * a.sb + (r - 1) * a.sn + c0, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] += load_param_or(a.bias, a.bias_dt, c0 + k, 0.f);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] += load_param(a.pos, a.pos_dt, r * a.D + c0 + k);
    store_vec<VEC>(static_cast<Tout*>(a.out) + row * a.D + c0, v);
  }
}

// grid: (ceil(N / 32), ceil(D / 32), B); block: (32, 8).
template <typename Tin, typename Tout>
__global__ void __launch_bounds__(256) assemble_transpose_kernel(AssembleArgs a) {
  __shared__ float tile[32][33];  // +1 column: conflict-free transposed reads
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.z, n0 = int64_t(blockIdx.x) * 32;
  const int d0 = blockIdx.y * 32;
  const Tin* f = static_cast<const Tin*>(a.feat) + b * a.sb;
#pragma unroll
  for (int j = 0; j < 32; j += 8) {
    const int64_t n = n0 + tx;
    const int d = d0 + ty + j;
    tile[ty + j][tx] = (n < a.N && d < a.D) ? to_f(f[n * a.sn + int64_t(d) * a.sd]) : 0.f;
  }
  __syncthreads();
  Tout* o = static_cast<Tout*>(a.out) + b * (a.N + 1) * a.D;
  const int d = d0 + tx;
  if (d >= a.D) return;
  const float bias = load_param_or(a.bias, a.bias_dt, d, 0.f);
#pragma unroll
  for (int j = 0; j < 32; j += 8) {
    const int64_t n = n0 + ty + j;
    if (n < a.N) {
      o[(n + 1) * a.D + d] = from_f<Tout>(tile[tx][ty + j] + bias + load_param(a.pos, a.pos_dt, (n + 1) * a.D + d));
    }
  }
  if (blockIdx.x == 0 && ty == 0) {
    o[d] = from_f<Tout>(load_param(a.cls, a.cls_dt, d) + load_param(a.pos, a.pos_dt, d));
  }
}

cudaError_t token_assemble(AssembleArgs a, bool rows_contiguous, bool vec8, cudaStream_t stream) {
  if (a.B == 0 || a.D == 0) return cudaSuccess;
  if (!rows_contiguous && a.B > 65535) throw std::invalid_argument("token_assemble: batch > 65535");
  return dispatch_io(a.in_dt, a.out_dt, [&](auto ti, auto to) -> cudaError_t {
    using TI = decltype(ti);
    using TO = decltype(to);
    if (rows_contiguous) {
      const int64_t work = a.B * (a.N + 1) * (vec8 ? a.D / 8 : a.D);
      const int64_t grid = cmin<int64_t>(ceil_div(work, 256), int64_t(num_sms()) * 8);
      if (vec8) {
        CVF_LAUNCH((assemble_rows_kernel<TI, TO, 8>), dim3(grid), dim3(256), 0, stream, a);
      } else {
        CVF_LAUNCH((assemble_rows_kernel<TI, TO, 1>), dim3(grid), dim3(256), 0, stream, a);
      }
    } else {
      const dim3 grid(unsigned(cmax<int64_t>(1, ceil_div(a.N, 32))), unsigned(ceil_div(a.D, 32)),
                      unsigned(a.B));
      CVF_LAUNCH((assemble_transpose_kernel<TI, TO>), grid, dim3(32, 8), 0, stream, a);
    }
    return cudaSuccess;
  });
}

}  // namespace cvf
