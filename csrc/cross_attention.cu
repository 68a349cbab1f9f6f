// K/V-free CLS cross-attention core (docs/cls_cross_attention.md), forward and
// backward. The host functional computes the small GEMVs with cuBLAS (q = Wq LN(cls) + bq,
// the absorbed keys kt_h = Wk_h^T q_h, o_h = Wv_h u_h + bv_h, the output projection); these
// kernels do everything that touches the N token rows:
//
//   rows n = 0 .. N1-1 of sample b: row 0 is cls[b], rows n >= 1 are tokens[b, n] (read in
//   place: no concatenation). xt_n = x_n - mean_n (centred), r_n = rstd_n, so that
//   LN(x_n) = gamma * xt_n * r_n + beta.
//
//   forward   z_hn = scale * r_n * (g_h . xt_n),   g_h = kt_h * gamma      (the constant
//             scale * kt_h . beta and the key bias shift every z_hn of a head equally: softmax
//             drops them exactly)
//             a_hn = softmax_n(z_hn) (online, one pass), u_h = sum_n a_hn LN(x_n)
//                  = gamma * (sum_n p_hn r_n xt_n) / l_h + beta.
//   backward  (du_h given) da_hn = du_h . LN(x_n) = r_n (e_h . xt_n) + du_h . beta, e_h = du_h * gamma
//             dz_hn = a_hn (da_hn - du_h . u_h);  cz_hn = scale * dz_hn
//             dkt_h = sum_n cz_hn LN(x_n) = gamma * (sum_n cz_hn r_n xt_n) + beta * sum_n cz_hn
//             dLN(x_n) = sum_h a_hn du_h + cz_hn kt_h, then the LayerNorm backward per row, whose
//             two row means reduce to per-row scalars (c1, c2 below): no extra pass over C.
//
// Kernel shape. One CTA per (split of the rows, head group, sample): with one query a sample is
// little work, so rows are split across CTAs when B is small and the partial (max, sum, u) are
// merged in a fixed order afterwards (flash-decoding style, deterministic). A CTA streams tiles of
// up to 32 rows through shared memory with cp.async double buffering (the next tile loads while
// the current one is computed). Per tile:
//   stats    one warp per row: two-pass mean / variance from shared memory (fwd only).
//   phase A  the H (fwd) or 2H (bwd) dot products per row: lane = row, each warp takes a slice of
//            the columns (split-K), 8 columns at a time with 16-byte shared loads; g / e rows are
//            warp-uniform (broadcast); partial sums are reduced across warps in a fixed order.
//   softmax  one warp per head: tile max, rescale factor, p = exp(z - m) (fwd) or the backward
//            coefficients (bwd); p * r_n is staged in shared memory.
//   phase B  each thread owns 8 columns x up to 4 heads of the (H, C) accumulator in registers
//            and adds sum_t p_t r_t xt_t over the tile's rows: 8 * 4 FMAs per 16-byte load.
// All arithmetic is fp32 FMA (no TF32: fp32 inputs stay fp32-accurate), loads are bf16/fp16/fp32.
// Per element of x the forward does 2H FMAs, the backward 2H (phase A) + H (phase B) and the dx
// kernel 2H: for CrossViT's H <= 12 this stays close to the bandwidth roofline.
//
// The dx kernel (`xattn_dx_kernel`) is separate: it needs every head's coefficients of a row,
// which head-grouped CTAs (wide C) do not have. It reads x once more and writes dx.
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace cvf {

constexpr int kTileRows = 32;  // rows per tile; phase A maps lane -> row
constexpr int kMaxHG = 16;     // heads per CTA (register arrays in phase A)
constexpr int kHPT = 4;        // heads per thread in phase B
constexpr int kMaxThreads = 512;
constexpr int kDxRows = 8;     // rows per iteration of the dx kernel
constexpr int kDxMaxThreads = 512;  // dx kernel block cap: 128 registers per thread


// Shared memory carve-up, identical on host (size) and device (pointers).
struct XaSmem {
  char* xt;   // 2 x TR x ldx elements (double buffer)
  float* g;   // HG x Cp: kt * gamma
  float* e;   // HG x Cp: du * gamma (backward)
  float* mu;  // TR
  float* rs;  // TR
  float* zp;  // NW x TR x HGZ: phase A partials
  float* P;   // TR x HG: p * r (fwd) or cz * r (bwd)
  float* st;  // 4 x HG: m, l, alpha, sum cz
};

__host__ __device__ inline int64_t xa_smem(const XaArgs& a, int nthreads, int elem, bool bwd,
                                           char* base, XaSmem* s) {
  const int64_t nw = nthreads / 32, hgz = bwd ? 2 * a.HG : a.HG;
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t o = off;
    off += round_up(bytes, 16);
    return base + o;
  };
  char* xt = take(2LL * a.TR * a.ldx * elem);
  float* g = reinterpret_cast<float*>(take(4LL * a.HG * a.Cp));
  float* e = reinterpret_cast<float*>(take(bwd ? 4LL * a.HG * a.Cp : 0));
  float* mu = reinterpret_cast<float*>(take(4LL * a.TR));
  float* rs = reinterpret_cast<float*>(take(4LL * a.TR));
  float* zp = reinterpret_cast<float*>(take(4LL * nw * a.TR * hgz));
  float* P = reinterpret_cast<float*>(take(4LL * a.TR * a.HG));
  float* st = reinterpret_cast<float*>(take(4LL * 4 * a.HG));
  if (s != nullptr) *s = XaSmem{xt, g, e, mu, rs, zp, P, st};
  return off;
}

template <typename T>
__device__ __forceinline__ const T* xa_row(const XaArgs& a, int64_t b, int64_t n) {
  return n == 0 ? static_cast<const T*>(a.cls) + b * a.cls_sb
                : static_cast<const T*>(a.tok) + b * a.tok_sb + n * a.tok_sn;
}

// Rows [t0, t0 + TR) of sample b into buffer `dst` (rows >= n_end and columns >= C are zero).
template <typename T>
__device__ __forceinline__ void xa_load_tile(const XaArgs& a, T* dst, int64_t b, int64_t t0,
                                             int64_t n_end) {
  if (a.async16) {
    constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte piece
    const int pieces = a.Cp / kPer;
    for (int i = threadIdx.x; i < a.TR * pieces; i += blockDim.x) {
      const int r = i / pieces, c = (i - r * pieces) * kPer;
      T* d = dst + r * a.ldx + c;
      if (t0 + r < n_end && c < a.C) {
        cp_async16(d, xa_row<T>(a, b, t0 + r) + c);
      } else {
        *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
      }
    }
  } else {
    for (int i = threadIdx.x; i < a.TR * a.Cp; i += blockDim.x) {
      const int r = i / a.Cp, c = i - r * a.Cp;
      dst[r * a.ldx + c] = (t0 + r < n_end && c < a.C) ? xa_row<T>(a, b, t0 + r)[c] : from_f<T>(0.f);
    }
  }
}

// grid: (S, G, B); block: nthreads (multiple of 32, <= kMaxThreads).
template <typename T, bool BWD>
__global__ void __launch_bounds__(kMaxThreads) xattn_kernel(XaArgs a) {
  CVF_DYNAMIC_SMEM(char, xa_smem_raw);
  XaSmem sm;
  xa_smem(a, blockDim.x, sizeof(T), BWD, xa_smem_raw, &sm);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  const int split = blockIdx.x, h0 = blockIdx.y * a.HG;
  const int64_t b = blockIdx.z;
  const int HG = cmin(a.HG, a.H - h0);  // heads of this CTA (the last group may be short)
  const int C = a.C, Cp = a.Cp, nch = Cp / 8, TR = a.TR;
  const int64_t n_begin = split * a.rps, n_end = cmin<int64_t>(a.N1, n_begin + a.rps);
  const int HGZ = BWD ? 2 * a.HG : a.HG;

  // Per-sample operands: g = kt * gamma (and e = du * gamma), zero beyond C and HG.
  for (int i = tid; i < a.HG * Cp; i += blockDim.x) {
    const int j = i / Cp, c = i - j * Cp;
    const bool ok = j < HG && c < C;
    const float gam = ok ? load_param_or(a.w, a.w_dt, c, 1.f) : 0.f;
    const int64_t src = (b * a.H + h0 + j) * C + c;
    sm.g[i] = ok ? a.kt[src] * gam : 0.f;
    if constexpr (BWD) sm.e[i] = ok ? a.du[src] * gam : 0.f;
  }
  if (tid < a.HG) {
    sm.st[tid] = -INFINITY;     // running max
    sm.st[a.HG + tid] = 0.f;    // running sum
    sm.st[2 * a.HG + tid] = 1.f;
    sm.st[3 * a.HG + tid] = 0.f;  // sum of cz (bwd)
  }

  // Phase B ownership: 8 columns (ch) x kHPT heads (hs) per thread.
  const int ch = tid % nch, hs = tid / nch;
  const bool owner = hs * kHPT < HG;
  float acc[kHPT][8];
#pragma unroll
  for (int jj = 0; jj < kHPT; ++jj)
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[jj][k] = 0.f;

  // Buffer i of the double buffer. Pointer arithmetic, not a two-pointer array: an array indexed
  // by the loop counter is placed in local memory (a 16-byte stack frame in ptxas's report).
  T* const xt0 = reinterpret_cast<T*>(sm.xt);
  auto xbuf = [&](int i) { return xt0 + (i & 1) * TR * a.ldx; };
  const int ntiles = int(ceil_div(n_end - n_begin, TR));
  xa_load_tile<T>(a, xbuf(0), b, n_begin, n_end);
  cp_async_commit();

  for (int it = 0; it < ntiles; ++it) {
    const int64_t t0 = n_begin + int64_t(it) * TR;
    const int nvalid = int(cmin<int64_t>(TR, n_end - t0));
    if (it + 1 < ntiles) xa_load_tile<T>(a, xbuf(it + 1), b, t0 + TR, n_end);
    cp_async_commit();  // possibly empty: keeps wait<1> meaning "all but the newest group"
    cp_async_wait<1>();
    __syncthreads();
    const T* x = xbuf(it);

    // ---- row statistics ----
    for (int r = warp; r < TR; r += nw) {
      float mean = 0.f, rstd = 0.f;
      if (r < nvalid) {
        if constexpr (BWD) {
          mean = a.mean[b * a.N1 + t0 + r];
          rstd = a.rstd[b * a.N1 + t0 + r];
        } else {
          float s = 0.f;
          for (int c = lane; c < C; c += 32) s += to_f(x[r * a.ldx + c]);
          mean = warp_sum(s) / C;
          float q = 0.f;
          for (int c = lane; c < C; c += 32) {
            const float d = to_f(x[r * a.ldx + c]) - mean;
            q += d * d;
          }
          rstd = rsqrtf(warp_sum(q) / C + a.eps);
          if (lane == 0 && blockIdx.y == 0) {
            a.mean[b * a.N1 + t0 + r] = mean;
            a.rstd[b * a.N1 + t0 + r] = rstd;
          }
        }
      }
      if (lane == 0) {
        sm.mu[r] = mean;
        sm.rs[r] = rstd;
      }
    }
    __syncthreads();

    // ---- phase A: dot products g . xt (and e . xt), lane = row, warps split the columns ----
    {
      float za[kMaxHG], zb[kMaxHG];
#pragma unroll
      for (int j = 0; j < kMaxHG; ++j) za[j] = zb[j] = 0.f;
      const int cpw = (nch + nw - 1) / nw;
      const int c_lo = warp * cpw, c_hi = cmin(nch, c_lo + cpw);
      if (lane < TR) {
        const float mu = sm.mu[lane];
        for (int q = c_lo; q < c_hi; ++q) {
          float xv[8];
          load8(x + lane * a.ldx + q * 8, xv);
#pragma unroll
          for (int k = 0; k < 8; ++k) xv[k] -= mu;
#pragma unroll
          for (int j = 0; j < kMaxHG; ++j) {
            if (j < HG) {
              float gv[8];
              load8(sm.g + j * Cp + q * 8, gv);
#pragma unroll
              for (int k = 0; k < 8; ++k) za[j] = fmaf(gv[k], xv[k], za[j]);
              if constexpr (BWD) {
                load8(sm.e + j * Cp + q * 8, gv);
#pragma unroll
                for (int k = 0; k < 8; ++k) zb[j] = fmaf(gv[k], xv[k], zb[j]);
              }
            }
          }
        }
        float* zp = sm.zp + (warp * TR + lane) * HGZ;
#pragma unroll
        for (int j = 0; j < kMaxHG; ++j) {
          if (j < HG) {
            if constexpr (BWD) {
              zp[2 * j] = za[j];
              zp[2 * j + 1] = zb[j];
            } else {
              zp[j] = za[j];
            }
          }
        }
      }
    }
    __syncthreads();

    // ---- per head: online softmax (fwd) or backward coefficients, lane = row ----
    for (int j = warp; j < HG; j += nw) {
      const int r = lane;
      const bool valid = r < nvalid;
      float zk = 0.f, zd = 0.f;
      if (valid) {
        for (int w = 0; w < nw; ++w) {
          const float* zp = sm.zp + (w * TR + r) * HGZ;
          if constexpr (BWD) {
            zk += zp[2 * j];
            zd += zp[2 * j + 1];
          } else {
            zk += zp[j];
          }
        }
      }
      const float rr = valid ? sm.rs[r] : 0.f;
      if constexpr (!BWD) {
        const float z = valid ? a.scale * rr * zk : -INFINITY;
        const float m_old = sm.st[j], m_new = fmaxf(m_old, warp_max(z));
        const float p = valid ? expf(z - m_new) : 0.f;
        const float alpha = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        const float psum = warp_sum(p);
        if (r < TR) sm.P[r * a.HG + j] = p * rr;
        if (lane == 0) {
          sm.st[j] = m_new;
          sm.st[a.HG + j] = sm.st[a.HG + j] * alpha + psum;
          sm.st[2 * a.HG + j] = alpha;
        }
      } else {
        const int64_t bh = b * a.H + h0 + j;
        float cz = 0.f;
        if (valid) {
          const float av = expf(a.scale * rr * zk - a.lse_in[bh]);
          const float da = rr * zd + a.dvec[2 * bh + 1];
          cz = a.scale * av * (da - a.dvec[2 * bh]);
          float* cf = a.coef + ((b * a.N1 + t0 + r) * a.H + h0 + j) * 3;
          cf[0] = av;
          cf[1] = cz;
          cf[2] = av * zd + cz * zk;
        }
        if (r < TR) sm.P[r * a.HG + j] = cz * rr;
        const float czsum = warp_sum(cz);
        if (lane == 0) sm.st[3 * a.HG + j] += czsum;
      }
    }
    __syncthreads();

    // ---- phase B: acc[h][c] = alpha_h acc[h][c] + sum_t P[t][h] xt[t][c] ----
    if (owner) {
      if constexpr (!BWD) {
#pragma unroll
        for (int jj = 0; jj < kHPT; ++jj) {
          const int j = hs * kHPT + jj;
          const float al = j < HG ? sm.st[2 * a.HG + j] : 1.f;
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[jj][k] *= al;
        }
      }
      for (int r = 0; r < nvalid; ++r) {
        float xv[8];
        load8(x + r * a.ldx + ch * 8, xv);
        const float mu = sm.mu[r];
        const float* pr = sm.P + r * a.HG + hs * kHPT;
#pragma unroll
        for (int jj = 0; jj < kHPT; ++jj) {
          if (hs * kHPT + jj < HG) {
            const float p = pr[jj];
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[jj][k] = fmaf(p, xv[k] - mu, acc[jj][k]);
          }
        }
      }
    }
    __syncthreads();  // buffer it & 1 and the staging arrays are reused next iteration
  }

  // ---- epilogue ----
  if (owner) {
#pragma unroll
    for (int jj = 0; jj < kHPT; ++jj) {
      const int j = hs * kHPT + jj;
      if (j >= HG) continue;
      const int64_t bh = b * a.H + h0 + j;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int c = ch * 8 + k;
        if (c >= C) continue;
        const float gam = load_param_or(a.w, a.w_dt, c, 1.f), bet = load_param_or(a.b, a.b_dt, c, 0.f);
        if constexpr (BWD) {
          a.dkt[(split * a.B * a.H + bh) * C + c] = gam * acc[jj][k] + bet * sm.st[3 * a.HG + j];
        } else if (a.S == 1) {
          a.u[bh * C + c] = gam * acc[jj][k] / sm.st[a.HG + j] + bet;
        } else {
          a.part_w[(split * a.B * a.H + bh) * C + c] = acc[jj][k];
        }
      }
    }
  }
  if constexpr (!BWD) {
    if (tid < HG) {
      const int64_t bh = b * a.H + h0 + tid;
      const float m = sm.st[tid], l = sm.st[a.HG + tid];
      if (a.S == 1) {
        a.lse[bh] = m + logf(l);
      } else {
        a.part_ml[2 * (split * a.B * a.H + bh)] = m;
        a.part_ml[2 * (split * a.B * a.H + bh) + 1] = l;
      }
    }
  }
}

// Merge of the row splits (S > 1), one CTA per (sample, head), fixed split order.
__global__ void __launch_bounds__(256) xattn_merge_kernel(XaArgs a) {
  const int64_t bh = blockIdx.x, BH = a.B * a.H;
  float M = -INFINITY;
  for (int s = 0; s < a.S; ++s) M = fmaxf(M, a.part_ml[2 * (s * BH + bh)]);
  float L = 0.f;
  for (int s = 0; s < a.S; ++s) L += a.part_ml[2 * (s * BH + bh) + 1] * expf(a.part_ml[2 * (s * BH + bh)] - M);
  for (int c = threadIdx.x; c < a.C; c += blockDim.x) {
    float w = 0.f;
    for (int s = 0; s < a.S; ++s) w += a.part_w[(s * BH + bh) * a.C + c] * expf(a.part_ml[2 * (s * BH + bh)] - M);
    a.u[bh * a.C + c] = load_param_or(a.w, a.w_dt, c, 1.f) * w / L + load_param_or(a.b, a.b_dt, c, 0.f);
  }
  if (threadIdx.x == 0) a.lse[bh] = M + logf(L);
}


// dx of the core: dLN_n = sum_h a_hn du_h + cz_hn kt_h (register tile: kDxRows rows x 4 columns
// per thread, du / kt read once per row group), then the LayerNorm backward with
//   c1_n = mean_c(gamma dLN_n)        = sum_h (a_hn sum(gamma du_h) + cz_hn sum(gamma kt_h)) / C
//   c2_n = mean_c(gamma dLN_n xhat_n) = r_n sum_h coef3_hn / C     (coef3 from the main kernel).
// A thread owns columns c0 .. c0 + 3 for c0 = 4 tid + 4 k blockDim.x (one pass when C <= 4 x
// the block, i.e. every CrossViT width), for the whole kernel. Register budget: at most
// kDxMaxThreads threads leave ptxas 128 registers (the 32-float tile, du / kt, addresses). gamma and
// the dgamma / dbeta partials live in shared memory at the owner's columns (3 x 4 bytes per column):
// as register arrays under a 1024-thread bound (64 registers) they spilled 128 B, and only their
// owner touches them, so no barrier or cross-thread reduction is needed and each partial is summed
// over the rows in the same order as before. grid: row groups (grid-stride).
template <typename T>
__global__ void __launch_bounds__(kDxMaxThreads) xattn_dx_kernel(XdArgs a) {
  CVF_DYNAMIC_SMEM(float, xd_smem);
  const int H = a.H, C = a.C, tid = threadIdx.x, Cq = int(round_up(C, 4));
  const int cstep = 4 * blockDim.x;
  float* sA = xd_smem;              // [H][kDxRows]
  float* sZ = sA + H * kDxRows;     // [H][kDxRows]
  float* sc = sZ + H * kDxRows;     // [kDxRows][4]: c1, c2, mean, rstd
  float* sg = sc + 4 * kDxRows;     // [Cq]: gamma
  float* sdw = sg + Cq;             // [Cq]: this CTA's dgamma partial
  float* sdb = sdw + Cq;            // [Cq]: dbeta partial
  for (int c0 = tid * 4; c0 < C; c0 += cstep) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      sg[c0 + k] = c0 + k < C ? load_param_or(a.w, a.w_dt, c0 + k, 1.f) : 0.f;
      sdw[c0 + k] = sdb[c0 + k] = 0.f;
    }
  }
  const int64_t gps = ceil_div(a.N1, kDxRows), groups = a.B * gps;
  for (int64_t gi = blockIdx.x; gi < groups; gi += gridDim.x) {
    const int64_t b = gi / gps, n0 = (gi - b * gps) * kDxRows;
    const int nv = int(cmin<int64_t>(kDxRows, a.N1 - n0));
    __syncthreads();  // the previous group's shared values are no longer read
    for (int i = tid; i < kDxRows * H; i += blockDim.x) {
      const int r = i / H, h = i - r * H;
      const float* cf = a.coef + ((b * a.N1 + n0 + r) * H + h) * 3;
      sA[h * kDxRows + r] = r < nv ? cf[0] : 0.f;
      sZ[h * kDxRows + r] = r < nv ? cf[1] : 0.f;
    }
    if (tid < kDxRows) {
      const int r = tid;
      float c1 = 0.f, c3 = 0.f, mean = 0.f, rstd = 0.f;
      if (r < nv) {
        const float* cf = a.coef + (b * a.N1 + n0 + r) * H * 3;
        for (int h = 0; h < H; ++h) {
          c1 += cf[3 * h] * a.gsum[2 * (b * H + h)] + cf[3 * h + 1] * a.gsum[2 * (b * H + h) + 1];
          c3 += cf[3 * h + 2];
        }
        mean = a.mean[b * a.N1 + n0 + r];
        rstd = a.rstd[b * a.N1 + n0 + r];
      }
      sc[4 * r] = c1 / C;
      sc[4 * r + 1] = rstd * c3 / C;
      sc[4 * r + 2] = mean;
      sc[4 * r + 3] = rstd;
    }
    __syncthreads();
    for (int c0 = tid * 4; c0 < C; c0 += cstep) {
      float acc[kDxRows][4];
#pragma unroll
      for (int r = 0; r < kDxRows; ++r)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[r][k] = 0.f;
      for (int h = 0; h < H; ++h) {
        float dv[4], kv[4];
        const float* dup = a.du + (b * H + h) * C + c0;
        const float* ktp = a.kt + (b * H + h) * C + c0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          dv[k] = c0 + k < C ? __ldg(dup + k) : 0.f;
          kv[k] = c0 + k < C ? __ldg(ktp + k) : 0.f;
        }
#pragma unroll
        for (int r = 0; r < kDxRows; ++r) {
          const float av = sA[h * kDxRows + r], zv = sZ[h * kDxRows + r];
#pragma unroll
          for (int k = 0; k < 4; ++k) acc[r][k] = fmaf(av, dv[k], fmaf(zv, kv[k], acc[r][k]));
        }
      }
#pragma unroll
      for (int r = 0; r < kDxRows; ++r) {
        if (r >= nv) break;
        const int64_t n = n0 + r;
        const float c1 = sc[4 * r], c2 = sc[4 * r + 1], mean = sc[4 * r + 2], rstd = sc[4 * r + 3];
        const T* xr = n == 0 ? static_cast<const T*>(a.cls) + b * a.cls_sb
                             : static_cast<const T*>(a.tok) + b * a.tok_sb + n * a.tok_sn;
        T* out = n == 0 ? static_cast<T*>(a.dcls) + b * C : static_cast<T*>(a.dtok) + (b * a.N1 + n) * C;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int c = c0 + k;
          if (c < C) {
            const float xh = (to_f(xr[c]) - mean) * rstd, dy = acc[r][k];
            out[c] = from_f<T>(rstd * (sg[c] * dy - c1 - xh * c2));
            sdw[c] += dy * xh;
            sdb[c] += dy;
            if (n == 0) static_cast<T*>(a.dtok)[b * a.N1 * C + c] = from_f<T>(0.f);
          }
        }
      }
    }
  }
  for (int c0 = tid * 4; c0 < C; c0 += cstep) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (c0 + k < C) {
        a.dw_part[int64_t(blockIdx.x) * C + c0 + k] = sdw[c0 + k];
        a.db_part[int64_t(blockIdx.x) * C + c0 + k] = sdb[c0 + k];
      }
    }
  }
}

void xattn_plan(XaArgs& a, bool bwd) {
  const int elem = a.dt == kF32 ? 4 : 2;
  a.Cp = int(round_up(a.C, 8));
  const int nch = a.Cp / 8;
  if (nch > kMaxThreads) {
    throw std::invalid_argument("cross_attention: width C = " + std::to_string(a.C) +
                                " exceeds the CUDA kernel's " + std::to_string(8 * kMaxThreads));
  }
  // Head groups: as few CTAs per sample as the register budget of phase B allows.
  auto hg_of = [&](int g) { return int(ceil_div(a.H, g)); };
  int G = 1;
  while (hg_of(G) > kMaxHG || nch * ceil_div(hg_of(G), kHPT) > kMaxThreads) ++G;
  a.HG = hg_of(G);
  a.G = int(ceil_div(a.H, a.HG));
  a.threads = int(cmax<int64_t>(128, round_up(nch * ceil_div(a.HG, kHPT), 32)));
  // Tile rows: as many as shared memory allows (<= 32); odd 16-byte row stride (no conflicts).
  const int64_t u16 = int64_t(a.Cp) * elem / 16;
  a.ldx = int((u16 % 2 == 0 ? u16 + 1 : u16) * 16 / elem);
  const int64_t budget = cmin<int64_t>(max_smem_optin(), 200 * 1024);
  for (a.TR = kTileRows; a.TR > 1; --a.TR) {
    if (xa_smem(a, a.threads, elem, bwd, nullptr, nullptr) <= budget) break;
  }
  const int64_t bytes = xa_smem(a, a.threads, elem, bwd, nullptr, nullptr);
  if (bytes > budget) {
    throw std::invalid_argument("cross_attention: C = " + std::to_string(a.C) + " with " +
                                std::to_string(a.H) + " heads needs more shared memory than this GPU has");
  }
  a.smem = int(bytes);
  // Row splits: enough CTAs for ~2 waves when the batch is small; whole tiles per split.
  const int64_t want = ceil_div(2LL * num_sms(), cmax<int64_t>(1, a.B * a.G));
  const int64_t S = cmax<int64_t>(1, cmin<int64_t>(want, ceil_div(a.N1, a.TR)));
  a.rps = round_up(ceil_div(a.N1, S), a.TR);
  a.S = int(ceil_div(a.N1, a.rps));
}

cudaError_t xattn_fwd(XaArgs a, cudaStream_t stream) {
  if (a.B == 0 || a.C == 0 || a.H == 0) return cudaSuccess;
  if (a.B > 65535) throw std::invalid_argument("cross_attention: batch exceeds 65535");
  CVF_TRY(dispatch_t(a.dt, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    CVF_TRY(allow_smem(xattn_kernel<T, false>, a.smem));
    CVF_LAUNCH((xattn_kernel<T, false>), dim3(a.S, a.G, a.B), dim3(a.threads), a.smem, stream, a);
    return cudaSuccess;
  }));
  if (a.S > 1) CVF_LAUNCH(xattn_merge_kernel, dim3(a.B * a.H), dim3(256), 0, stream, a);
  return cudaSuccess;
}

cudaError_t xattn_bwd(XaArgs a, cudaStream_t stream) {
  if (a.B == 0 || a.C == 0 || a.H == 0) return cudaSuccess;
  if (a.B > 65535) throw std::invalid_argument("cross_attention: batch exceeds 65535");
  return dispatch_t(a.dt, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    CVF_TRY(allow_smem(xattn_kernel<T, true>, a.smem));
    CVF_LAUNCH((xattn_kernel<T, true>), dim3(a.S, a.G, a.B), dim3(a.threads), a.smem, stream, a);
    return cudaSuccess;
  });
}

int xattn_dx_threads(int C) {
  return int(cmin<int64_t>(kDxMaxThreads, cmax<int64_t>(32, round_up(ceil_div(C, 4), 32))));
}

int64_t xattn_dx_grid(int64_t B, int64_t N1) {
  return cmax<int64_t>(1, cmin<int64_t>(B * ceil_div(N1, kDxRows), int64_t(num_sms()) * 4));
}

cudaError_t xattn_dx(XdArgs a, cudaStream_t stream) {
  if (a.B == 0 || a.C == 0) return cudaSuccess;
  const int threads = xattn_dx_threads(a.C);
  const int64_t grid = xattn_dx_grid(a.B, a.N1);
  const int smem = int(sizeof(float) * (2 * a.H * kDxRows + 4 * kDxRows + 3 * round_up(a.C, 4)));
  return dispatch_t(a.dt, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    CVF_TRY(allow_smem(xattn_dx_kernel<T>, smem));
    CVF_LAUNCH((xattn_dx_kernel<T>), dim3(grid), dim3(threads), smem, stream, a);
    return cudaSuccess;
  });
}

}  // namespace cvf
