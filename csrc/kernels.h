// Torch-free interface of the CUDA kernels: argument structs and launchers. The .cu files include
// only this header (CUDA runtime + common.cuh), so they compile in seconds and can be checked
// with nvcc on a machine whose torch has no CUDA; bindings.cpp does the tensor plumbing
// (validation, allocation, device guard, current stream) and calls these launchers.
//
// Every launcher checks each launch (cudaGetLastError) and returns the first error; bindings.cpp
// raises it with C10_CUDA_CHECK. Plans that cannot run (too wide, too much shared memory) throw
// std::invalid_argument (ValueError in Python) before anything is launched.
#pragma once

#include <cstdint>

#ifdef CVF_EMULATE
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace cvf {

// Runtime dtype codes shared by the launchers and the kernels.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct LnFwdArgs {
  const void* x;
  int64_t x_rs;  // row stride (elements)
  const void* res;
  int64_t res_rs;
  void* y;    // (rows, C) contiguous, Tout
  void* sum;  // (rows, C) contiguous, Tin; written when res != nullptr
  const void* w;
  int w_dt;
  const void* b;
  int b_dt;
  float* mean;
  float* rstd;
  int64_t rows;
  int C;
  int lanes;  // set by the launcher
  float eps;
  bool gelu;
  int in_dt, out_dt;  // dtype codes of x (and residual, sum) and y
  bool vec8;          // 16-byte aligned rows and C % 8 == 0
};


struct LnBwdArgs {
  const void* dy;  // (rows, C) contiguous, Tdy
  const void* x;   // the normalised input s, Tin
  int64_t x_rs;
  const float* mean;
  const float* rstd;
  const void* w;
  int w_dt;
  const void* b;
  int b_dt;
  void* dx;        // (rows, C) contiguous, Tin
  float* dw_part;  // (gridDim.x, C)
  float* db_part;
  int64_t rows;
  int C;
  int lanes;  // set by the launcher
  bool gelu;
  int in_dt, dy_dt;
  bool vec8;
};


struct BiasGeluArgs {
  const void* h;  // (rows, C), row stride h_rs
  int64_t h_rs;
  const void* bias;  // (C,) or nullptr
  int b_dt;
  const void* dy;  // backward: (rows, C) contiguous
  void* out;       // forward y / backward dh: (rows, C) contiguous
  float* db_part;  // backward: (gridDim.y, C)
  int64_t rows;
  int C;
  int dt;
  bool vec8;
};


struct AssembleArgs {
  const void* feat;
  int64_t sb, sn, sd;  // feat strides (elements) over (b, n, d)
  const void* bias;
  int bias_dt;
  const void* cls;
  int cls_dt;
  const void* pos;  // (1 + N, D) contiguous
  int pos_dt;
  void* out;  // (B, 1 + N, D) contiguous
  int64_t B, N;
  int D;
  int in_dt, out_dt;
};


struct XaArgs {
  const void* cls;  // (B, C), row stride cls_sb
  int64_t cls_sb;
  const void* tok;  // (B, N1, C), strides tok_sb, tok_sn (last dim contiguous)
  int64_t tok_sb, tok_sn;
  const void* w;  // LN weight / bias (C,) or nullptr
  int w_dt;
  const void* b;
  int b_dt;
  const float* kt;  // (B, H, C) absorbed keys, unscaled
  // forward outputs
  float* u;        // (B, H, C): written when S == 1
  float* lse;      // (B, H): written when S == 1
  float* mean;     // (B, N1): written by forward, read by backward
  float* rstd;
  float* part_w;   // (S, B, H, C): unnormalised sum_n p r xt (S > 1)
  float* part_ml;  // (S, B, H, 2): running max and sum (S > 1)
  // backward
  const float* du;    // (B, H, C)
  const float* dvec;  // (B, H, 2): du.u, du.beta
  const float* lse_in;
  float* coef;  // (B, N1, H, 3): a, cz, a (e.xt) + cz (g.xt)
  float* dkt;   // (S, B, H, C) partials of dkt
  int64_t B, N1, rps;  // rps: rows per split
  int C, Cp, H, HG, S, TR, ldx;
  float scale, eps;
  bool async16;  // rows 16-byte aligned: cp.async; else element loads
  int dt;        // dtype code of cls / tokens
  // launch plan (xattn_plan)
  int G, threads, smem;
};


struct XdArgs {
  const void* cls;
  int64_t cls_sb;
  const void* tok;
  int64_t tok_sb, tok_sn;
  const void* w;
  int w_dt;
  const float* mean;  // (B, N1)
  const float* rstd;
  const float* coef;  // (B, N1, H, 3)
  const float* gsum;  // (B, H, 2): sum_c gamma du, sum_c gamma kt
  const float* du;    // (B, H, C)
  const float* kt;
  void* dcls;  // (B, C) contiguous
  void* dtok;  // (B, N1, C) contiguous (row 0: zeros)
  float* dw_part;  // (gridDim.x, C)
  float* db_part;
  int64_t B, N1;
  int C, H;
  int dt;
};


// ---- launchers (stream: the caller's current stream; device: the current device) ----

cudaError_t ln_fwd(LnFwdArgs a, cudaStream_t stream);
// Number of dw / db partial rows ln_bwd writes (the caller allocates (grid, C) fp32 twice).
int64_t ln_bwd_grid(int64_t rows, int C, bool vec8);
cudaError_t ln_bwd(LnBwdArgs a, cudaStream_t stream);

cudaError_t bias_gelu_fwd(BiasGeluArgs a, cudaStream_t stream);
int64_t bias_gelu_bwd_slices(int64_t rows, int C, bool vec8);
cudaError_t bias_gelu_bwd(BiasGeluArgs a, cudaStream_t stream);

cudaError_t token_assemble(AssembleArgs a, bool rows_contiguous, bool vec8, cudaStream_t stream);

// Fills a.Cp, HG, G, threads, TR, ldx, smem, rps, S from a.B, N1, C, H, dt (bwd: backward kernel).
void xattn_plan(XaArgs& a, bool bwd);
cudaError_t xattn_fwd(XaArgs a, cudaStream_t stream);  // + merge when a.S > 1
cudaError_t xattn_bwd(XaArgs a, cudaStream_t stream);
int xattn_dx_threads(int C);
int64_t xattn_dx_grid(int64_t B, int64_t N1);
cudaError_t xattn_dx(XdArgs a, cudaStream_t stream);

}  // namespace cvf
