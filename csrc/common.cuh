// Shared device helpers for the crossvit_fast CUDA kernels (sm_80 / sm_90).
//
// * dtype helpers: kernels compute in fp32 and load/store bf16, fp16 or fp32 ("Tin"/"Tout").
//   Small parameter vectors (LayerNorm affine, biases, CLS / position embeddings) are read
//   through `load_param` with a runtime dtype code, so a bf16 activation with fp32 parameters
//   (autocast) needs no extra cast launch and no extra template instantiation.
// * 16-byte vector loads/stores of 8 elements (`load8` / `store8`): one LDG.128 for 2-byte types,
//   two for fp32. Callers guarantee 16-byte alignment (checked on the host, see `aligned16`).
// * warp / group reductions with shuffles; cp.async (sm_80+) for the cross-attention tiles.
// * CVF_LAUNCH: every launch goes through it so it is checked (C10_CUDA_KERNEL_LAUNCH_CHECK)
//   and so the CPU emulator used by the tests (csrc/emu) can run the very same kernels.
#pragma once

#include <cstdint>

#ifdef CVF_EMULATE
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "kernels.h"

#ifdef CVF_EMULATE
#define CVF_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::cvf::emu::dynamic_smem())
#else
#define CVF_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace cvf {

using bf16 = __nv_bfloat16;
using fp16 = __half;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(fp16 v) { return __half2float(v); }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ fp16 from_f<fp16>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round-trip through T: the value a tensor of dtype T would hold.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_f(from_f<T>(v));
}

// One element of a small parameter vector whose dtype is only known at run time.
__device__ __forceinline__ float load_param(const void* p, int dt, int64_t i) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kF16) return __half2float(static_cast<const fp16*>(p)[i]);
  return __bfloat162float(static_cast<const bf16*>(p)[i]);
}

__device__ __forceinline__ float load_param_or(const void* p, int dt, int64_t i, float dflt) {
  return p == nullptr ? dflt : load_param(p, dt, i);
}

// 8 consecutive elements <-> 8 floats, 16-byte vector accesses (p must be 16-byte aligned).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <typename T2>  // fp16 / bf16: one 16-byte load
__device__ __forceinline__ void load8(const T2* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T2* e = reinterpret_cast<const T2*>(&raw);
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = to_f(e[k]);
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T2>
__device__ __forceinline__ void store8(T2* p, const float (&v)[8]) {
  uint4 raw;
  T2* e = reinterpret_cast<T2*>(&raw);
#pragma unroll
  for (int k = 0; k < 8; ++k) e[k] = from_f<T2>(v[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Load / store VEC (8 or 1) elements; VEC == 1 is the scalar fallback for unaligned rows.
template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 8) {
    load8(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_f(p[k]);
  }
}
template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[VEC]) {
  if constexpr (VEC == 8) {
    store8(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[k] = from_f<T>(v[k]);
  }
}

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over a group of `lanes` consecutive threads (a warp, or `lanes / 32` whole warps of one
// block). Every thread of the block must call it (it synchronises the block when lanes > 32);
// `red` is block shared memory of at least blockDim.x / 32 float2. Fixed order: deterministic.
__device__ __forceinline__ float2 group_sum2(float2 v, int lanes, float2* red) {
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  if (lanes <= 32) return v;
  const int warp = threadIdx.x >> 5, first = (warp / (lanes >> 5)) * (lanes >> 5);
  __syncthreads();  // `red` may still be read by the previous call
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  float2 s = make_float2(0.f, 0.f);
  for (int w = first; w < first + (lanes >> 5); ++w) {
    s.x += red[w].x;
    s.y += red[w].y;
  }
  return s;
}

// erf-GELU (nn.GELU(approximate='none')) and its derivative, fp32.
__device__ __forceinline__ float gelu_erf(float x) {
  return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
}
__device__ __forceinline__ float gelu_erf_grad(float x) {
  const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
  const float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
  return cdf + x * pdf;
}

// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers and L1, so the next
// tile streams in while the current one is computed. The emulator maps them to plain copies.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifdef CVF_EMULATE
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef CVF_EMULATE
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef CVF_EMULATE
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <typename T>
__host__ __device__ __forceinline__ T cmin(T a, T b) { return a < b ? a : b; }
template <typename T>
__host__ __device__ __forceinline__ T cmax(T a, T b) { return a < b ? b : a; }

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace cvf

// ---- host side ----
namespace cvf {

#ifdef CVF_EMULATE
#define CVF_LAUNCH(kernel, grid, block, smem, stream, ...)                         \
  do {                                                                             \
    ::cvf::emu::launch(dim3(grid), dim3(block), (smem), [&]() { kernel(__VA_ARGS__); }); \
  } while (0)
#else
// Launch and check (the same check as C10_CUDA_KERNEL_LAUNCH_CHECK); the error is returned to
// bindings.cpp, which raises it with the CUDA error string.
#define CVF_LAUNCH(kernel, grid, block, smem, stream, ...)        \
  do {                                                            \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__);   \
    const cudaError_t cvf_err_ = cudaGetLastError();              \
    if (cvf_err_ != cudaSuccess) return cvf_err_;                 \
  } while (0)
#endif

// Attributes of the current device (bindings.cpp sets it to the tensors' device).
inline int device_attr(cudaDeviceAttr attr) {
  int dev = 0, v = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&v, attr, dev);
  return v;
}
inline int num_sms() { return cmax(1, device_attr(cudaDevAttrMultiProcessorCount)); }
inline int max_smem_optin() { return cmax(48 * 1024, device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin)); }

// Dynamic shared memory above 48 KiB must be opted into per kernel (a cheap host call).
template <typename K>
inline cudaError_t allow_smem(K kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
#define CVF_TRY(expr)                          \
  do {                                         \
    const cudaError_t cvf_e_ = (expr);         \
    if (cvf_e_ != cudaSuccess) return cvf_e_;  \
  } while (0)

// dtype-code dispatch: f receives a value of the element type (a tag).
template <typename F>
inline cudaError_t dispatch_t(int code, F&& f) {
  switch (code) {
    case kF32: return f(float{});
    case kF16: return f(fp16{});
    default: return f(bf16{});
  }
}
// (input, output) pairs the fused kernels are instantiated for: the same dtype, a 16-bit input
// with an fp32 output (autocast's fp32 LayerNorm of a bf16 tensor) and an fp32 input with a
// 16-bit output (a LayerNorm feeding an autocast GEMM: the cast is fused into the store).
template <typename F>
inline cudaError_t dispatch_io(int in, int out, F&& f) {
  if (in == out) return dispatch_t(in, [&](auto t) { return f(t, t); });
  if (out == kF32) return dispatch_t(in, [&](auto t) { return f(t, float{}); });
  if (in == kF32) return dispatch_t(out, [&](auto t) { return f(float{}, t); });
  return cudaErrorInvalidValue;
}

}  // namespace cvf
