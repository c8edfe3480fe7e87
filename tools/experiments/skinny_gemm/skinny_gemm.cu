// EXPERIMENT (session 23, issue 7; not used by cat_titan): a hand-written Hopper GEMM for the
// batch-64 decode step, out (M, N) [+]= x (M, K) @ w (N, K)^T with M <= 64, bf16 in/out, fp32
// accumulate. Measured on an H100 against cuBLAS in docs/benchmarks.md ("Session 23"): faster
// in a chain of back-to-back GEMMs with PDL (428 vs 471 us for a step's 49 GEMMs), slower in the
// lean step's real layer sequence, where half the GEMMs follow a Triton kernel (683 vs 665 us).
// Build (one library with session 24's ffn_fused.cu; both include sm90.cuh):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
//        -o libskinny_gemm.so skinny_gemm.cu ffn_fused.cu
// then bench_skinny_gemm.py / bench_ffn_fused.py (same folder) check the kernels against fp32 and time them.
//
// Design. Swap-AB: the weight's rows are the MMA's M side, the (padded) 64 batch rows its N side.
// Per CTA: BN weight rows x a K range. Warp 4 (one thread) streams 128B-swizzled (BN x 64) weight
// tiles and (64 x 64) activation tiles with TMA through an ST-stage mbarrier ring; warps 0-3 (one
// warpgroup) run wgmma m64n64k16 straight from those tiles, keeping one stage's MMAs in flight.
// Split-K runs across a thread-block cluster (1, S): every CTA leaves its fp32 partial in its own
// shared memory and CTA r reduces batch rows [r*64/S, (r+1)*64/S) over the cluster through DSMEM
// (no atomics, a fixed summation order). PDL: the first ST weight tiles are requested before
// griddepcontrol.wait, so a GEMM's weight stream starts while the previous kernel finishes.
// mode 0 stores, mode 1 adds into out (the residual stream), mode 2 is w1|w3 with SwiGLU and the
// RMSNorm row scale in the epilogue (weight rows interleaved in BN/2 blocks; warp 5 sums x^2).
#include "sm90.cuh"
#include <cooperative_groups.h>
#include <cstring>

namespace cg = cooperative_groups;

constexpr int NCW = 4;      // consumer warps: one warpgroup (warps 0-3)
constexpr int NT = 6 * 32;  // + warp 4: the TMA producer, warp 5: row sums of x (mode 2)

template <int BN, int ST>
__global__ void __launch_bounds__(NT, 1)
sg_kernel(const __grid_constant__ CUtensorMap tw, const __grid_constant__ CUtensorMap tx, bf16* __restrict__ out,
          int mode, float eps, int M, int N, int K, int ldo) {
  constexpr int NACC = BN / 2;  // fp32 accumulators per consumer thread
  constexpr int WB = BN * 128, XB = 64 * 128, SB = WB + XB;
  constexpr int PS = BN + 4;  // fp32 partial row stride: conflict-free fragment stores
  static_assert(ST * SB >= 64 * PS * 4 + 256, "the partial tile and row sums reuse the stage buffers");
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = (uint8_t*)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);  // 128B swizzle: 1024-aligned
  uint64_t* bars = (uint64_t*)(smem + ST * SB);                                     // full[ST], empty[ST]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * BN;
  const int S = gridDim.y, split = blockIdx.y;
  const int nkb = (K + 63) / 64;
  const int kb0 = split * nkb / S, nk = (split + 1) * nkb / S - kb0;

  asm volatile("griddepcontrol.launch_dependents;");
  if (threadIdx.x == 0) {
    asm volatile("prefetch.tensormap [%0];" ::"l"((uint64_t)&tw) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"((uint64_t)&tx) : "memory");
    for (int s = 0; s < ST; ++s) {
      mbar_init(smem_u32(&bars[s]), 1);
      mbar_init(smem_u32(&bars[ST + s]), NCW + (mode == 2));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  float acc[NACC];
  float ssr[16];  // aux warp, mode 2: sum(x^2) over the CTA's K range of rows 4 it + lane / 8, chunk lane % 8
#pragma unroll
  for (int it = 0; it < 16; ++it) ssr[it] = 0.f;
#pragma unroll
  for (int e = 0; e < NACC; ++e) acc[e] = 0.f;

  if (warp == NCW) {  // producer
    if (lane == 0) {
      uint64_t pol;
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
      const int pro = nk < ST ? nk : ST;
      for (int i = 0; i < pro; ++i) {  // weights do not depend on the previous kernel
        const uint32_t fb = smem_u32(&bars[i]);
        mbar_expect_tx(fb, SB);
        tma_2d_hint(smem_u32(smem + i * SB), &tw, fb, (kb0 + i) * 64, n0, pol);
      }
      asm volatile("griddepcontrol.wait;" ::: "memory");  // the activations do
      for (int i = 0; i < pro; ++i) tma_2d(smem_u32(smem + i * SB + WB), &tx, smem_u32(&bars[i]), (kb0 + i) * 64, 0);
      for (int i = pro; i < nk; ++i) {
        const int s = i % ST;
        mbar_wait(smem_u32(&bars[ST + s]), ((i / ST) + 1) & 1);
        const uint32_t fb = smem_u32(&bars[s]);
        mbar_expect_tx(fb, SB);
        tma_2d_hint(smem_u32(smem + s * SB), &tw, fb, (kb0 + i) * 64, n0, pol);
        tma_2d(smem_u32(smem + s * SB + WB), &tx, fb, (kb0 + i) * 64, 0);
      }
    }
  } else if (warp < NCW) {  // one warpgroup: wgmma straight from the swizzled tiles
    for (int i = 0; i < nk; ++i) {
      const int s = i % ST;
      mbar_wait(smem_u32(&bars[s]), (i / ST) & 1);
      const uint32_t wb = smem_u32(smem + s * SB), xb = wb + WB;
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int h = 0; h < BN / 64; ++h)
          wgmma64(acc + 32 * h, wg_desc(wb + h * 8192 + kk * 32), wg_desc(xb + kk * 32));
      wg_commit();
      // stage i - 1's MMAs are done once at most one group (stage i's) is pending: release its slot
      wg_wait1();
      if (i > 0 && lane == 0) mbar_arrive(smem_u32(&bars[ST + (i - 1) % ST]));
    }
    wg_wait0();
  } else if (warp == NCW + 1) {  // aux (mode 2): sum(x^2) per row, reading each x tile conflict-free
    if (mode == 2) {
      for (int i = 0; i < nk; ++i) {
        const int s = i % ST;
        mbar_wait(smem_u32(&bars[s]), (i / ST) & 1);
        const uint4* t = (const uint4*)(smem + s * SB + WB);  // 64 rows x 8 chunks; lane: chunk lane % 8
#pragma unroll
        for (int it = 0; it < 16; ++it) {  // rows 4 it + lane / 8
          const uint4 v = t[it * 32 + lane];
          const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __bfloat1622float2(*(const __nv_bfloat162*)&w[e]);
            ssr[it] += f.x * f.x + f.y * f.y;
          }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(smem_u32(&bars[ST + s]));
      }
    }
  }
  __syncthreads();  // every stage consumed: the ring becomes the partial tile P (64 x PS fp32, [m][n])
  float* P = (float*)smem;
  if (warp < NCW) {
    const int g = lane >> 2, q = lane & 3;
    // wgmma's accumulator layout: per 8 batch rows j, 4 values at weight rows g, g + 8 and batch rows 2q, 2q + 1
#pragma unroll
    for (int f = 0; f < NACC / 4; ++f)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = f / 8, j = f % 8;
        const int base = t * 64 + warp * 16;
        P[(j * 8 + q * 2 + (e & 1)) * PS + base + g + (e >> 1) * 8] = acc[f * 4 + e];
      }
  }
  float* Q = P + 64 * PS;  // mode 2: per batch row, sum(x^2) over this CTA's K range
  if (mode == 2 && warp == NCW + 1) {
#pragma unroll
    for (int it = 0; it < 16; ++it) {
      float v = ssr[it];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      if (lane % 8 == 0) Q[it * 4 + lane / 8] = v;
    }
  }
  cg::cluster_group cluster = cg::this_cluster();  // (a 1-CTA "cluster" when launched without one)
  if (S > 1) cluster.sync(); else __syncthreads();
  const int rank = S > 1 ? (int)cluster.block_rank() : 0;
  const int m_lo = rank * 64 / S, m_hi = min((rank + 1) * 64 / S, M);
  if (mode == 2) {  // tile = [BN/2 gate rows | BN/2 up rows] of units n0/2 + [0, BN/2): out (M, N/2) = SwiGLU(r *)
    constexpr int H = BN / 2;
    for (int idx = threadIdx.x; idx < (m_hi - m_lo) * (H / 4); idx += NT) {
      const int m = m_lo + idx / (H / 4), j = (idx % (H / 4)) * 4;
      float4 g = make_float4(0.f, 0.f, 0.f, 0.f), u = g;
      float q = 0.f;
      for (int p = 0; p < S; ++p) {
        const float* src = S > 1 ? cluster.map_shared_rank(P, p) : P;
        const float4 a = *(const float4*)(src + m * PS + j), b = *(const float4*)(src + m * PS + H + j);
        g.x += a.x; g.y += a.y; g.z += a.z; g.w += a.w;
        u.x += b.x; u.y += b.y; u.z += b.z; u.w += b.w;
        q += src[64 * PS + m];
      }
      const float r = rsqrtf(q / (float)K + eps);
      float o[4] = {g.x, g.y, g.z, g.w}, w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float a = o[e] * r;
        o[e] = a / (1.f + __expf(-a)) * (w[e] * r);
      }
      __nv_bfloat162 h0 = __floats2bfloat162_rn(o[0], o[1]), h1 = __floats2bfloat162_rn(o[2], o[3]);
      uint2 w2;
      w2.x = *(uint32_t*)&h0;
      w2.y = *(uint32_t*)&h1;
      *(uint2*)(out + (size_t)m * ldo + n0 / 2 + j) = w2;
    }
  } else
  for (int idx = threadIdx.x; idx < (m_hi - m_lo) * (BN / 4); idx += NT) {
    const int m = m_lo + idx / (BN / 4), nn = (idx % (BN / 4)) * 4, n = n0 + nn;
    if (n >= N) continue;
    float4 u[8];
#pragma unroll
    for (int p = 0; p < 8; ++p)  // all loads first, then a fixed-order sum
      if (p < S) u[p] = *(const float4*)((S > 1 ? cluster.map_shared_rank(P, p) : P) + m * PS + nn);
    float4 v = u[0];
#pragma unroll
    for (int p = 1; p < 8; ++p)
      if (p < S) { v.x += u[p].x; v.y += u[p].y; v.z += u[p].z; v.w += u[p].w; }
    bf16* o = out + (size_t)m * ldo + n;
    if (mode == 1) {
      const uint2 r = *(const uint2*)o;
      const float2 r0 = __bfloat1622float2(*(const __nv_bfloat162*)&r.x);
      const float2 r1 = __bfloat1622float2(*(const __nv_bfloat162*)&r.y);
      v.x += r0.x; v.y += r0.y; v.z += r1.x; v.w += r1.y;
    }
    __nv_bfloat162 h0 = __floats2bfloat162_rn(v.x, v.y), h1 = __floats2bfloat162_rn(v.z, v.w);
    uint2 w2;
    w2.x = *(uint32_t*)&h0;
    w2.y = *(uint32_t*)&h1;
    *(uint2*)o = w2;
  }
  if (S > 1) cluster.sync();  // peers read this CTA's P until here
}

// ------------------------------------------------------------------------------------------------
// host side (ctypes)
// ------------------------------------------------------------------------------------------------
typedef CUresult (*EncodeTiled)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

extern "C" int sg_make_tmap(void* dst128, void* ptr, long long rows, long long cols, long long ld, int box_rows) {
  static EncodeTiled encode = nullptr;
  if (!encode) {
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void**)&encode, 12000, cudaEnableDefault, &q) !=
            cudaSuccess || q != cudaDriverEntryPointSuccess)
      return -1;
  }
  alignas(64) CUtensorMap m;
  cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  cuuint64_t strides[1] = {(cuuint64_t)ld * 2};
  cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  cuuint32_t es[2] = {1, 1};
  CUresult r = encode(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ptr, dims, strides, box, es,
                      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return (int)r;
  memcpy(dst128, &m, sizeof(m));
  return 0;
}

template <int BN, int ST>
static int launch_t(const void* pw, const void* px, void* out, int mode, float eps, int M, int N, int K, int ldo, int S,
                    int pdl, cudaStream_t st) {
  auto kern = sg_kernel<BN, ST>;
  const int smem = ST * (BN * 128 + 64 * 128) + 2 * ST * 8 + 1024;
  static bool ready = false;
  if (!ready) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return 1000 + (int)e;
    ready = true;
  }
  alignas(64) CUtensorMap w, x;
  memcpy(&w, pw, sizeof(w));
  memcpy(&x, px, sizeof(x));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((N + BN - 1) / BN, S, 1);
  cfg.blockDim = dim3(NT, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute at[2];
  int na = 0;
  if (S > 1) {  // a cluster launch only where split-K needs one
    at[na].id = cudaLaunchAttributeClusterDimension;
    at[na].val.clusterDim.x = 1;
    at[na].val.clusterDim.y = S;
    at[na].val.clusterDim.z = 1;
    ++na;
  }
  if (pdl) {
    at[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[na].val.programmaticStreamSerializationAllowed = 1;
    ++na;
  }
  cfg.attrs = at;
  cfg.numAttrs = na;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kern, w, x, (bf16*)out, mode, eps, M, N, K, ldo);
  return e == cudaSuccess ? 0 : 2000 + (int)e;
}

// cfg -> (BN, stages): 0 (128, 4), 1 (64, 6), 2 (128, 8), 3 (64, 12), 4 (128, 6), 5 (64, 4)
extern "C" int sg_box_rows(int cfg) { return cfg % 2 ? 64 : 128; }

extern "C" int sg_launch(int cfg, const void* tw, const void* tx, void* out, int mode, float eps, int M, int N, int K,
                         int ldo, int S, int pdl, void* stream) {
  if (M < 1 || M > 64 || N % 8 || ldo % 8 || S < 1 || S > 8) return -2;
  cudaStream_t st = (cudaStream_t)stream;
  switch (cfg) {
    case 0: return launch_t<128, 4>(tw, tx, out, mode, eps, M, N, K, ldo, S, pdl, st);
    case 1: return launch_t<64, 6>(tw, tx, out, mode, eps, M, N, K, ldo, S, pdl, st);
    case 2: return launch_t<128, 8>(tw, tx, out, mode, eps, M, N, K, ldo, S, pdl, st);
    case 3: return launch_t<64, 12>(tw, tx, out, mode, eps, M, N, K, ldo, S, pdl, st);
    case 4: return launch_t<128, 6>(tw, tx, out, mode, eps, M, N, K, ldo, S, pdl, st);
    case 5: return launch_t<64, 4>(tw, tx, out, mode, eps, M, N, K, ldo, S, pdl, st);
  }
  return -3;
}

