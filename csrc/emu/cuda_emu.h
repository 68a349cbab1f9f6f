// A small CPU emulator of the CUDA features the crossvit_fast kernels use, for tests only.
//
// Built with -DCVF_EMULATE by tests/test_cuda_build.py (through torch.utils.cpp_extension.load,
// host compiler only), it runs the very same kernel source on CPU threads: one std::thread per
// CUDA thread, blocks one after another, __syncthreads and warp shuffles as barriers. That makes
// the indexing, tiling, masking and reduction logic of every kernel testable on a machine without
// a GPU, against the PyTorch reference. It does not model timing, memory coalescing, or races
// that only a real GPU's scheduling would expose.
//
// Shared memory starts filled with NaN bytes (0xFF) so a read of an element no thread wrote shows
// up as a NaN in the results. A thread that returns early leaves the block's barriers, as an
// exited CUDA thread does.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// 16-bit float storage types with round-to-nearest-even conversions.
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline float __half2float(__half v) { return float(std::bit_cast<_Float16>(v.x)); }
inline __half __float2half_rn(float f) { return {std::bit_cast<uint16_t>(static_cast<_Float16>(f))}; }

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- CUDA runtime API subset ----
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  // A small pretend GPU: few SMs so that row splits and grid-stride loops are exercised.
  *v = a == cudaDevAttrMultiProcessorCount ? 3 : 160 * 1024;
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) {
  return cudaSuccess;
}

namespace cvf::emu {

struct Warp {
  std::unique_ptr<std::barrier<>> bar;
  uint64_t slot[32];
};
struct BlockCtx {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<Warp> warps;
  std::vector<uint4> smem;
};

inline thread_local BlockCtx* tl_block = nullptr;
inline thread_local unsigned tl_tid = 0;

inline void* dynamic_smem() { return tl_block->smem.data(); }

}  // namespace cvf::emu

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { cvf::emu::tl_block->bar->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8);
  cvf::emu::Warp& w = cvf::emu::tl_block->warps[cvf::emu::tl_tid / 32];
  const unsigned lane = cvf::emu::tl_tid % 32;
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  w.bar->arrive_and_wait();
  T r;
  std::memcpy(&r, &w.slot[lane ^ unsigned(lane_mask)], sizeof(T));
  w.bar->arrive_and_wait();
  return r;
}

namespace cvf::emu {

// Runs body() as grid x block threads. Blocks run one after another on a pool of
// block-size threads; each block gets fresh barriers and NaN-filled shared memory.
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, F body) {
  const unsigned nt = block.x * block.y * block.z;
  if (nt == 0 || nt > 1024 || nt % 32 != 0) throw std::invalid_argument("emu: block size must be a multiple of 32 <= 1024");
  const size_t nblocks = size_t(grid.x) * grid.y * grid.z;
  std::vector<BlockCtx> blocks(nblocks);
  for (auto& b : blocks) {
    b.bar = std::make_unique<std::barrier<>>(nt);
    b.warps.resize(nt / 32);
    for (auto& w : b.warps) w.bar = std::make_unique<std::barrier<>>(32);
  }
  std::barrier<> between(nt);
  std::vector<uint4> shared((smem + 15) / 16 + 1);
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (unsigned t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      blockDim = block;
      gridDim = grid;
      tl_tid = t;
      size_t k = 0;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x, ++k) {
            if (t == 0) std::memset(static_cast<void*>(shared.data()), 0xFF, shared.size() * 16);
            between.arrive_and_wait();
            BlockCtx& b = blocks[k];
            if (t == 0) b.smem.swap(shared);
            between.arrive_and_wait();
            tl_block = &b;
            blockIdx = {x, y, z};
            body();
            // Leave the block like an exited CUDA thread: later barriers no longer wait for it.
            b.warps[t / 32].bar->arrive_and_drop();
            b.bar->arrive_and_drop();
            between.arrive_and_wait();
            if (t == 0) b.smem.swap(shared);
          }
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace cvf::emu
