// EXPERIMENT (session 24, issue 7; not used by cat_titan): a decoder layer's whole feed-forward half
// at batch <= 64 as ONE persistent kernel, h += SwiGLU(r * h W13^T) W2^T with the ffn norm's weight
// folded into W13 (r = RMSNorm's row scale of h). The lean step runs it as three kernels (cuBLAS
// w1|w3, swiglu_rows, cuBLAS w2 + residual); session 23 measured that a hand-written GEMM gains only
// where its weight stream can start before its predecessor ends. Here the w2 weight tiles are
// requested while the w1|w3 tiles are still being consumed: one weight stream per SM, no kernel
// boundary, no grid-wide barrier; CTAs hand data to each other through flags in global memory.
// Result (H100, docs/benchmarks.md "Session 24"): correct, and slower: 24.4 us per layer against the
// three kernels' 23.3, and +5% on the lean step. Each hand-off between CTAs (act written, flag seen,
// act read; split-K partials written, counted, summed) costs 1.5-3.6 us while the memory system streams
// weights at full rate, about what a kernel boundary costs.
// Built into the same library as skinny_gemm.cu (its header; it provides sg_make_tmap):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
//        -o libskinny_gemm.so skinny_gemm.cu ffn_fused.cu
//
// One CTA per SM (grid <= SM count, all resident: the flags below are spun on). Warps 0-3 (one
// warpgroup) run wgmma, warp 4 (one thread) streams TMA tiles through an ST-stage ring, warp 5
// computes row scales. The ring's stage counter runs across both phases.
// * row scales: CTA i < M computes r[i] = rsqrt(mean(h[i]^2) + eps) and counts it in cnt[R]; in every
//   phase-A CTA the same warp then waits for all M and copies them to shared memory during the MMAs.
// * phase A, CTA u < F/32: gate and up of units f in [32u, 32u + 32) for all rows, K = D. W13 rows
//   are interleaved in 16-row groups [8 gate | the same 8 up] so that wgmma's accumulator gives each
//   thread the gate and up of the same (unit, row): act[m, f] = silu(r_m g) (r_m u), stored bf16;
//   then cnt[ACT + u/2] += 1 (a 64-column group of act is ready at 2).
// * phase B, CTA i < (D/128) S: n-block nb = i / S (128 rows of W2), split s = i % S of K = F. Its
//   W2 tiles are requested as soon as ring slots free up (during phase A); each act tile waits for
//   its group's flag. The fp32 partial goes to a workspace in the accumulator's own layout; after
//   all S splits of nb counted in cnt[RED + nb], split s sums 1/S of the tile over the S partials
//   in a fixed order and adds it into h (deterministic, no atomics on data).
// * the last CTA to finish (cnt[DONE]) zeroes every counter for the next launch. Each counter has its
//   own 128-byte line (cnt[32 i]): spinning CTAs then do not queue behind each other's atomics.
// * diagnostics: every wait is bounded and reports where it stopped (dbg), and thread 0 of each CTA
//   stamps %globaltimer at each step (the bench prints the timeline).
#include "sm90.cuh"
#include <cstring>

namespace {
constexpr int NCW = 4, NT = 6 * 32;
constexpr int WBMAX = 128 * 128, XB = 64 * 128, SB = WBMAX + XB;  // a stage: weight tile | act tile
constexpr int MAXS = 12, MAXV = 4;  // most splits of phase B; most float4 slots a thread reduces
constexpr int R = 0, DONE = 1, ACT = 2;                               // counter slots; RED follows ACT

// Every wait is bounded: past ~2^31 cycles (~1 s) a CTA records (code, value seen, target, thread) in
// dbg[DBG cta ...] once and goes on, so a logic error ends the kernel with a report instead of hanging the GPU.
constexpr long long SPIN_CYCLES = 1ll << 31;
constexpr int DBG = 24;  // ints per CTA in dbg: [code, seen, target, thread], then 10 u64 timestamps (ns)
__device__ __forceinline__ void stamp(int* dbg, int k) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  ((unsigned long long*)(dbg + DBG * blockIdx.x + 4))[k] = t;
}
__device__ void stuck(int* dbg, int code, int seen, int target) {
  if (atomicCAS(dbg + DBG * blockIdx.x, 0, code) == 0) {
    dbg[DBG * blockIdx.x + 1] = seen;
    dbg[DBG * blockIdx.x + 2] = target;
    dbg[DBG * blockIdx.x + 3] = threadIdx.x;
  }
}
__device__ __forceinline__ void spin_flag(const int* p, int target, int* dbg, int code) {
  for (const long long t0 = clock64(); clock64() - t0 < SPIN_CYCLES;) {
    if (ld_acquire(p) >= target) return;
    __nanosleep(64);
  }
  stuck(dbg, code, ld_acquire(p), target);
}
__device__ __forceinline__ void wait_bar(uint32_t bar, uint32_t parity, int* dbg, int code, int at) {
  for (const long long t0 = clock64(); clock64() - t0 < SPIN_CYCLES;) {
    uint32_t ok;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
    if (ok) return;
  }
  stuck(dbg, code, at, (int)parity);
}

template <int ST>
__global__ void __launch_bounds__(NT, 1)
ffn_kernel(const __grid_constant__ CUtensorMap tw13, const __grid_constant__ CUtensorMap th,
           const __grid_constant__ CUtensorMap tw2, const __grid_constant__ CUtensorMap tact, bf16* __restrict__ h,
           bf16* __restrict__ act, float* __restrict__ part, float* __restrict__ rs, int* __restrict__ cnt,
           int* __restrict__ dbg,
           int M, int D, int F, int S, float eps, int phases) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = (uint8_t*)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
  uint64_t* bars = (uint64_t*)(smem + ST * SB);  // full[ST], empty[ST]
  float* rsm = (float*)(smem + ST * SB + 256);     // the 64 row scales (phase A)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, cta = blockIdx.x;
  const int RED = ACT + F / 64;
  const int nA = F / 32, nkA = D / 64;                 // phase A units, k tiles
  const int nB = (D / 128) * S, nkF = F / 64;          // phase B units, k tiles of F
  // phases (timing only): bit 0 runs A, bit 1 runs B; B alone reads act as the last launch left it
  const bool hasA = (phases & 1) && cta < nA, hasB = (phases & 2) && cta < nB;
  const int nb = cta / S, sp = cta % S;
  const int kb0 = sp * nkF / S, nkB = (sp + 1) * nkF / S - kb0;

  asm volatile("griddepcontrol.launch_dependents;");
  if (threadIdx.x == 0) {
    const CUtensorMap* maps[4] = {&tw13, &th, &tw2, &tact};
    for (int i = 0; i < 4; ++i) asm volatile("prefetch.tensormap [%0];" ::"l"(maps[i]) : "memory");
    for (int s = 0; s < ST; ++s) {
      mbar_init(smem_u32(&bars[s]), 1);
      mbar_init(smem_u32(&bars[ST + s]), NCW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x == 0) stamp(dbg, 0);
  auto full = [&](uint32_t g) { return smem_u32(&bars[g % ST]); };
  auto empty = [&](uint32_t g) { return smem_u32(&bars[ST + g % ST]); };
  auto stage = [&](uint32_t g) { return smem_u32(smem + (g % ST) * SB); };

  if (warp == NCW) {  // producer: one thread
    if (lane == 0) {
      uint64_t pol;
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
      uint32_t g = 0;
      if (hasA) {
        const int pro = nkA < ST ? nkA : ST;
        for (int i = 0; i < pro; ++i) {  // weights first: they do not depend on the previous kernel
          mbar_expect_tx(full(i), 64 * 128 + XB);
          tma_2d_hint(stage(i), &tw13, full(i), i * 64, cta * 64, pol);
        }
        asm volatile("griddepcontrol.wait;" ::: "memory");
        for (int i = 0; i < pro; ++i) tma_2d(stage(i) + WBMAX, &th, full(i), i * 64, 0);
        for (int i = pro; i < nkA; ++i) {
          wait_bar(empty(i), ((i / ST) + 1) & 1, dbg, 1, i);
          mbar_expect_tx(full(i), 64 * 128 + XB);
          tma_2d_hint(stage(i), &tw13, full(i), i * 64, cta * 64, pol);
          tma_2d(stage(i) + WBMAX, &th, full(i), i * 64, 0);
        }
        g = nkA;
      } else {
        asm volatile("griddepcontrol.wait;" ::: "memory");
      }
      if (hasB) {
        int xi = 0;
        auto issue_act = [&](int j) {  // act tile j of this split: wait for both phase-A CTAs of its group
          if (phases & 1) spin_flag(cnt + 32 * (ACT + kb0 + j), 2, dbg, 3);
          fence_proxy_async_global();
          tma_2d(stage(g + j) + WBMAX, &tact, full(g + j), (kb0 + j) * 64, 0);
        };
        for (int i = 0; i < nkB; ++i) {
          const uint32_t gi = g + i;
          if (gi >= ST) wait_bar(empty(gi), ((gi / ST) + 1) & 1, dbg, 2, gi);
          mbar_expect_tx(full(gi), 128 * 128 + XB);
          tma_2d_hint(stage(gi), &tw2, full(gi), (kb0 + i) * 64, nb * 128, pol);
          // the slot of W tile i + 1 frees once the consumers are past tile i + 2 - ST (they release a
          // stage one stage late): its act tile must be on its way before that W tile is waited for
          if (i - xi >= ST - 2) issue_act(xi++);
        }
        for (; xi < nkB; ++xi) issue_act(xi);
      }
    }
  } else if (warp == NCW + 1) {  // row scales
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (cta < M) {
      const uint4* row = (const uint4*)(h + (size_t)cta * D);
      float ss = 0.f;
      for (int c = lane; c < D / 8; c += 32) {
        const uint4 v = row[c];
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __bfloat1622float2(*(const __nv_bfloat162*)&w[e]);
          ss += f.x * f.x + f.y * f.y;
        }
      }
#pragma unroll
      for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      if (lane == 0) {
        rs[cta] = rsqrtf(ss / (float)D + eps);
        __threadfence();
        atomicAdd(cnt + 32 * R, 1);
      }
    }
    if (hasA) {  // all M scales into shared memory while phase A's MMAs run, then tell the consumers
      if (lane == 0) spin_flag(cnt + 32 * R, M, dbg, 6);
      __syncwarp();
      for (int m = lane; m < 64; m += 32) rsm[m] = m < M ? __ldcg(rs + m) : 0.f;
      asm volatile("bar.arrive 2, %0;" ::"r"((NCW + 1) * 32) : "memory");
    }
  } else {  // consumers: warps 0-3
    asm volatile("griddepcontrol.wait;" ::: "memory");
    const int g8 = lane >> 2, q = lane & 3;
    uint32_t g = 0;
    if (hasA) {
      float acc[32];
#pragma unroll
      for (int e = 0; e < 32; ++e) acc[e] = 0.f;
      for (int i = 0; i < nkA; ++i) {
        wait_bar(full(i), (i / ST) & 1, dbg, 4, i);
        const uint32_t wb = stage(i), xb = wb + WBMAX;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma64(acc, wg_desc(wb + kk * 32), wg_desc(xb + kk * 32));
        wg_commit();
        wg_wait1();  // stage i - 1's MMAs are done: release its slot
        if (i > 0 && lane == 0) mbar_arrive(empty(i - 1));
      }
      wg_wait0();
      if (threadIdx.x == 0) stamp(dbg, 1);
      if (lane == 0) mbar_arrive(empty(nkA - 1));
      g = nkA;
      bar_sync(2, (NCW + 1) * 32);  // the aux warp has the row scales in rsm
      if (threadIdx.x == 0) stamp(dbg, 2);
      // accumulator (64 weight rows x 64 batch rows): acc[4j + e] at weight row 16 warp + g8 + 8 (e >> 1),
      // batch row 8j + 2q + (e & 1); weight row 16 warp + g8 is gate of unit 8 warp + g8, + 8 its up
      const int f = cta * 32 + warp * 8 + g8;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = 8 * j + 2 * q + e;
          if (m < M) {
            const float r = rsm[m], a = acc[4 * j + e] * r, b = acc[4 * j + e + 2] * r;
            act[(size_t)m * F + f] = __float2bfloat16(a / (1.f + __expf(-a)) * b);
          }
        }
      bar_sync(1, NCW * 32);
      if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(cnt + 32 * (ACT + cta / 2), 1);
        stamp(dbg, 3);
      }
    }
    if (hasB) {
      float acc[64];
#pragma unroll
      for (int e = 0; e < 64; ++e) acc[e] = 0.f;
      for (int i = 0; i < nkB; ++i) {
        const uint32_t gi = g + i;
        wait_bar(full(gi), (gi / ST) & 1, dbg, 5, gi);
        const uint32_t wb = stage(gi), xb = wb + WBMAX;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          wgmma64(acc, wg_desc(wb + kk * 32), wg_desc(xb + kk * 32));
          wgmma64(acc + 32, wg_desc(wb + 8192 + kk * 32), wg_desc(xb + kk * 32));
        }
        wg_commit();
        wg_wait1();
        if (i > 0 && lane == 0) mbar_arrive(empty(gi - 1));
      }
      wg_wait0();
      if (threadIdx.x == 0) stamp(dbg, 4);
      if (lane == 0 && nkB > 0) mbar_arrive(empty(g + nkB - 1));
      // the partial in the accumulator's layout, float4 slot v of thread t at [v][t] (coalesced)
      float4* dst = (float4*)part + (size_t)cta * 2048 + threadIdx.x;
#pragma unroll
      for (int v = 0; v < 16; ++v)
        __stcg(dst + v * 128, make_float4(acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3]));
      // split sp sums float4 slots [lo, hi) of nb's tile over its S partials; slot v = [fv][t] holds thread
      // t's accumulator values 4 fv ... 4 fv + 3, at h[m (+1)][n (+8)]. Only this CTA writes those h values,
      // so they are read now, while the other splits finish.
      const int lo = sp * 2048 / S, hi = (sp + 1) * 2048 / S;
      bf16* o[MAXV][4];
      float hv[MAXV][4];
#pragma unroll
      for (int k = 0; k < MAXV; ++k) {
        const int v = lo + threadIdx.x + k * NCW * 32, t = v % 128, fv = v / 128;
        const int n = nb * 128 + (fv / 8) * 64 + (t / 32) * 16 + ((t % 32) >> 2), m = (fv % 8) * 8 + 2 * (t & 3);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          o[k][e] = h + (size_t)(m + (e & 1)) * D + n + (e >> 1) * 8;
          hv[k][e] = v < hi && m + (e & 1) < M ? __bfloat162float(__ldcg(o[k][e])) : 0.f;
        }
      }
      bar_sync(1, NCW * 32);
      if (threadIdx.x == 0) {
        __threadfence();
        stamp(dbg, 5);
        atomicAdd(cnt + 32 * (RED + nb), 1);
        spin_flag(cnt + 32 * (RED + nb), S, dbg, 7);
        stamp(dbg, 6);
      }
      bar_sync(1, NCW * 32);
      const float4* base = (const float4*)part + (size_t)nb * S * 2048;
#pragma unroll
      for (int k = 0; k < MAXV; ++k) {
        const int v = lo + threadIdx.x + k * NCW * 32;
        if (v < hi) {
          float4 pv[MAXS];  // every partial's load first, then the fixed-order sum
#pragma unroll
          for (int p = 0; p < MAXS; ++p)
            if (p < S) pv[p] = __ldcg(base + (size_t)p * 2048 + v);
          float4 a = pv[0];
#pragma unroll
          for (int p = 1; p < MAXS; ++p)
            if (p < S) { a.x += pv[p].x; a.y += pv[p].y; a.z += pv[p].z; a.w += pv[p].w; }
          const float vals[4] = {a.x, a.y, a.z, a.w};
          const int m = ((v / 128) % 8) * 8 + 2 * ((v % 128) & 3);
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (m + (e & 1) < M) *o[k][e] = __float2bfloat16(hv[k][e] + vals[e]);
        }
      }
      if (threadIdx.x == 0) stamp(dbg, 7);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    stamp(dbg, 8);
    if (atomicAdd(cnt + 32 * DONE, 1) == (int)gridDim.x - 1) {  // every CTA is past its last flag read
      for (int i = 0; i < RED + D / 128; ++i) cnt[32 * i] = 0;
      __threadfence();
    }
  }
}

template <int ST>
int launch_t(const void* maps, void* h, void* act, void* part, void* rs, void* cnt, void* dbg, int M, int D, int F,
             int S, float eps, int grid, int pdl, int phases, cudaStream_t st) {
  auto kern = ffn_kernel<ST>;
  const int smem = ST * SB + 512 + 1024;  // ring, barriers + row scales, alignment
  static bool ready = false;
  if (!ready) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return 1000 + (int)e;
    ready = true;
  }
  alignas(64) CUtensorMap m[4];
  memcpy(m, maps, sizeof(m));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(NT, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kern, m[0], m[1], m[2], m[3], (bf16*)h, (bf16*)act, (float*)part,
                                     (float*)rs, (int*)cnt, (int*)dbg, M, D, F, S, eps, phases);
  return e == cudaSuccess ? 0 : 2000 + (int)e;
}
}  // namespace

// Workspaces: act (64, F) bf16 with its map (box 64 x 64), part (grid * 128 * 64) fp32, rs (64) fp32,
// cnt (ffn_counters(D, F)) int32 zeroed once, dbg (24 grid) int32 zeroed (stays zero unless a wait
// timed out: see stuck()). maps: 4 x 128 bytes from sg_make_tmap: w13 (2F, D) interleaved,
// box 64 rows; h (M, D), box 64; w2 (D, F), box 128; act, box 64. phases: 3 (1 or 2 time one phase).
extern "C" int ffn_counters(int D, int F) { return 32 * (ACT + F / 64 + D / 128); }

extern "C" int ffn_launch(int stages, const void* maps, void* h, void* act, void* part, void* rs, void* cnt, void* dbg,
                          int M, int D, int F, int S, float eps, int grid, int pdl, int phases, void* stream) {
  if (M < 1 || M > 64 || D % 128 || F % 64 || F / 32 > grid || (D / 128) * S > grid || S < 4 || S > MAXS || S > F / 64)
    return -2;
  cudaStream_t st = (cudaStream_t)stream;
  switch (stages) {
    case 6: return launch_t<6>(maps, h, act, part, rs, cnt, dbg, M, D, F, S, eps, grid, pdl, phases, st);
    case 8: return launch_t<8>(maps, h, act, part, rs, cnt, dbg, M, D, F, S, eps, grid, pdl, phases, st);
  }
  return -3;
}
