// The fp32 dot products of round_query_clusters on the GPU (round_internal.hpp): the prefilter's
// distance costs and the mass cost with each candidate's ranked targets.
//
// Both reproduce the CPU reference step by step (src/cpu/round.cpp with core/round_arithmetic.hpp):
// every dot product is lane_dot's (8 lanes of separately rounded multiplies and adds, then the fixed
// tree), the softmax's maximum and sum run over the key clusters in order, one lane per candidate,
// and every masked sum adds its kept key clusters in ascending order. Only order-free steps are
// parallel: the dot products of different pairs, the exps and divisions of different entries, the
// minimum of the prefilter (a NaN never wins; -0 and +0 tie downstream) and the ranking.
//
// A block holds a tile of 32 candidates (x rows in shared memory, zero past the end) and its 256
// threads take 64 centroid rows at a time, 8 candidates each: the x values a warp reads are the same
// for all its lanes (broadcasts), each row is read from global memory by 4 threads at about the same
// time (L1 hits after the first). The blocks walk one flat list of every head's tiles.
#include <cfloat>

#include "core/round_arithmetic.hpp"
#include "cuda/round/round_device.cuh"
#include "cuda/round/round_internal.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda::qround {

namespace {

using round_math::lane_dot;
using round_math::mass_exp;

constexpr int kRowLanes = 64;                         // rows a block works on at once
constexpr int kGroup = kTile / (kCostThreads / kRowLanes);  // candidates per thread: 8
static_assert(kGroup == 8 && kTile % 32 == 0);

// xs[i][d] = x of the tile's candidate i (point pts[i] of (b,h)) as fp32; zero rows past `count`.
template <typename T>
__device__ void load_tile(const PointsView& q, int64_t b, int64_t h, const int32_t* pts, int count, float* xs) {
  const int64_t D = q.D;
  const T* base = static_cast<const T*>(q.data) + b * q.stride[0] + h * q.stride[1];
  for (int64_t e = threadIdx.x; e < kTile * D; e += blockDim.x) {
    const int i = static_cast<int>(e / D);
    const int64_t d = e - i * D;
    xs[e] = i < count ? to_f32(base[pts[i] * q.stride[2] + d * q.stride[3]]) : 0.0f;
  }
}

template <bool kVec>
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  if constexpr (kVec) {
    const float4 a = *reinterpret_cast<const float4*>(p), c = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = c.x, v[5] = c.y, v[6] = c.z, v[7] = c.w;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = p[j];
  }
}

// For each row this thread's row lane takes (lane, lane + 64, ... < rows): the dot products of its
// group's 8 candidates with row_of(row), each exactly lane_dot(x, row, D); visit(row, k, dot) for
// candidate group * 8 + k. kVec: rows and xs are read 8 floats at a time (D % 4 == 0, aligned).
template <bool kVec, class RowOf, class Visit>
__device__ void tile_dots(const float* xs, int64_t D, int64_t rows, RowOf&& row_of, Visit&& visit) {
  const int lane = static_cast<int>(threadIdx.x) % kRowLanes, group = static_cast<int>(threadIdx.x) / kRowLanes;
  const float* xg = xs + group * kGroup * D;
  for (int64_t row = lane; row < rows; row += kRowLanes) {
    const float* rp = row_of(row);
    float part[kGroup][8] = {};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      float rv[8];
      load8<kVec>(rp + d, rv);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        float xv[8];
        load8<kVec>(xg + k * D + d, xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) part[k][j] = rn::add(part[k][j], rn::mul(xv[j], rv[j]));
      }
    }
    for (; d < D; ++d) {
      const float r = rp[d];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) part[k][0] = rn::add(part[k][0], rn::mul(xg[k * D + d], r));
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const float (&p)[8] = part[k];
      visit(row, k, rn::add(rn::add(rn::add(p[0], p[1]), rn::add(p[2], p[3])), rn::add(rn::add(p[4], p[5]), rn::add(p[6], p[7]))));
    }
  }
}

// This block's tiles of the flat list over every head's list of points (list_of(bh, info): the
// points and their count): loads each into xs, then f(bh, info, first, count) between two barriers.
template <typename T, class ListOf, class F>
__device__ void for_each_tile(const CostInputs& in, const Dims& dims, const HeadInfo* infos, const int32_t* tiles,
                              float* xs, ListOf&& list_of, F&& f) {
  const int64_t total = tiles[dims.BH];
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const int64_t bh = head_of(tiles, dims.BH, t);
    const HeadInfo info = infos[bh];
    const int64_t first = (t - tiles[bh]) * kTile;
    int64_t points = 0;
    const int32_t* list = list_of(bh, info, points);
    const int count = static_cast<int>(min_of<int64_t>(kTile, points - first));
    load_tile<T>(in.q, bh / dims.H, bh % dims.H, list + first, count, xs);
    __syncthreads();
    f(bh, info, first, count);
    __syncthreads();
  }
}

__device__ __forceinline__ const int32_t* head_labels(const CostInputs& in, int64_t bh, int64_t H) {
  return in.labels + (bh / H) * in.labels_stride_b + (bh % H) * in.labels_stride_h;
}

// ---------------------------------------------------------------------------------------------
// Prefilter: best[u] = min over targets r of (|c_r|^2 - 2 x.c_r) - (|c_own|^2 - 2 x.c_own), fp32.
// ---------------------------------------------------------------------------------------------

template <typename T, bool kVec>
__global__ void __launch_bounds__(kCostThreads) prefilter_kernel(CostInputs in, Dims dims, Work w) {
  const int64_t D = dims.D, C = dims.C, N = dims.N;
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);  // [kTile][D]
  float* own = xs + kTile * D;                  // [kTile]
  float* partial = own + kTile;                 // [kRowLanes][kTile]
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kRowLanes, group = tid / kRowLanes;
  const auto list_of = [&](int64_t bh, const HeadInfo& info, int64_t& points) {
    points = info.P0;
    return w.pts0 + bh * N;
  };
  for_each_tile<T>(
      in, dims, w.info, w.tiles0, xs, list_of, [&](int64_t bh, const HeadInfo& info, int64_t first, int count) {
        const float* qc = in.qc + bh * C * D;
        const float* c2 = w.c2 + bh * C;
        const int32_t* targets = w.targets + bh * C;
        const int32_t* pts0 = w.pts0 + bh * N;
        const int32_t* labels = head_labels(in, bh, dims.H);
        if (tid < count) {
          const int64_t c = labels[pts0[first + tid]];
          own[tid] = rn::sub(c2[c], rn::mul(2.0f, lane_dot(xs + tid * D, qc + c * D, D)));
        }
        __syncthreads();
        // This thread's minimum per candidate, kept in its own shared-memory slots (registers hold the dots).
        float* m = partial + lane * kTile + group * kGroup;
#pragma unroll
        for (int k = 0; k < kGroup; ++k) m[k] = INFINITY;
        tile_dots<kVec>(
            xs, D, info.R, [&](int64_t r) { return qc + targets[r] * D; },
            [&](int64_t r, int k, float dot) {
              const float v = rn::sub(rn::sub(c2[targets[r]], rn::mul(2.0f, dot)), own[group * kGroup + k]);
              if (v < m[k]) m[k] = v;  // NaN never wins
            });
        __syncthreads();
        if (tid < count) {
          float b = INFINITY;
          for (int l = 0; l < kRowLanes; ++l) b = partial[l * kTile + tid] < b ? partial[l * kTile + tid] : b;
          w.best[bh * N + first + tid] = b;
        }
      });
}

// ---------------------------------------------------------------------------------------------
// Mass cost and ranking.
// ---------------------------------------------------------------------------------------------

constexpr int kWarps = kCostThreads / 32;
// Key clusters whose weights sit in shared memory at once: 128 x 32 doubles, 32 KB, so that two
// blocks fit an SM. Every masked sum reads its weights from there (an L2 read per add, the previous
// design, made the sums latency-bound: about 60 of the 70.8 ms measured at Wan 14B).
constexpr int kChunk = 128;
// Masked sums a warp carries in registers through the chunks (32 registers): the weights of a chunk
// are staged once per 8 x 16 = 128 targets.
constexpr int kTargetsPerWarp = 16;
static_assert(kChunk % 32 == 0 && kTile == 32 && kCostThreads % kTile == 0);

// s plus the weights zc[j - j0][lane] of the set bits j of the mask words bits[w0, w1) (chunk j0),
// in ascending j as the reference adds them.
__device__ __forceinline__ double masked_sum(const uint32_t* bits, int64_t w0, int64_t w1, int64_t j0, const double* zc,
                                             int lane, double s) {
  for (int64_t wd = w0; wd < w1; ++wd) {
    uint32_t m = bits[wd];
    const int base = static_cast<int>(wd * 32 - j0);
    while (m != 0) {
      const int j = base + __ffs(m) - 1;
      m &= m - 1;
      s = rn::add(s, zc[j * kTile + lane]);
    }
  }
  return s;
}

// A tile of 32 candidates (lane l of every warp: candidate l). z, the block's scratch in global
// memory, holds the scores, then the unnormalised weights, then the weights. The maximum is
// order-free (a NaN never wins, and the sign of a zero maximum does not reach the weights: exp(+-0)
// = 1, x - (+-0) = x otherwise); the weights and their sum go chunk by chunk (warp 0 adds a chunk's
// weights from shared memory in order of j, as the reference). Then the masked sums: per block of
// 128 targets, each chunk's weights staged in shared memory and every warp adding them into its 16
// targets' sums (warp 0 also the own cluster's, in the first block), in order of j.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kCostThreads) mass_kernel(CostInputs in, Dims dims, Work w) {
  const int64_t D = dims.D, C = dims.C, Ck = dims.Ck, W = dims.W;
  extern __shared__ double smem8[];
  double* zc = smem8;                                       // [kChunk][kTile]
  double* part = zc + kChunk * kTile;                       // [kWarps][kTile]
  double* row_max = part + kWarps * kTile;                  // [kTile]
  double* row_sum = row_max + kTile;                        // [kTile]
  double* own_mass = row_sum + kTile;                       // [kTile]
  float* xs = reinterpret_cast<float*>(own_mass + kTile);   // [kTile][D]
  double* z = w.tile_z + blockIdx.x * kTile * Ck;           // [Ck][kTile]
  double* cost = w.tile_cost + blockIdx.x * kTile * C;      // [R][kTile]
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const float scale = dims.scale;
  const double max_cost = dims.max_cost;
  const auto allowed = [&](double c) { return c != c || c > max_cost ? static_cast<double>(INFINITY) : c; };
  const auto list_of = [&](int64_t bh, const HeadInfo& info, int64_t& points) {
    points = info.P;
    return w.pts + bh * dims.Pb;
  };
  for_each_tile<T>(
      in, dims, w.info, w.tiles, xs, list_of, [&](int64_t bh, const HeadInfo& info, int64_t first, int count) {
        const float* kc = in.kc + bh * Ck * D;
        const int32_t* ks = in.ks + bh * Ck;
        const int32_t* targets = w.targets + bh * C;
        const uint32_t* rowbits = w.rowbits + bh * C * W;
        const int32_t* donor = w.donor + bh * dims.Pb;
        const int64_t R = info.R, kk = info.kk;
        if (info.any_key) {
          // The row of lane's candidate's own cluster, read before the dots: read after them, the
          // head's 64-bit offset bh * Pb stayed live through them and spilled (generic rows, 128 registers).
          const int32_t own_row = lane < count ? donor[first + lane] : 0;
          double* zg = z + (tid / kRowLanes) * kGroup;  // this thread's group of candidates
          tile_dots<kVec>(
              xs, D, Ck, [=](int64_t j) { return kc + j * D; },
              [=](int64_t j, int k, float dot) { zg[j * kTile + k] = static_cast<double>(rn::mul(scale, dot)); });
          __syncthreads();
          double m = -INFINITY;
          for (int64_t j = warp; j < Ck; j += kWarps)
            if (ks[j] > 0) m = m < z[j * kTile + lane] ? z[j * kTile + lane] : m;  // std::max: NaN never wins
          part[warp * kTile + lane] = m;
          __syncthreads();
          if (warp == 0) {
            for (int k = 1; k < kWarps; ++k) m = m < part[k * kTile + lane] ? part[k * kTile + lane] : m;
            row_max[lane] = m;
          }
          double sum = 0.0;  // warp 0's
          for (int64_t j0 = 0; j0 < Ck; j0 += kChunk) {
            const int64_t jn = min_of<int64_t>(kChunk, Ck - j0);
            __syncthreads();  // row_max is written; the previous chunk is summed
            for (int64_t e = tid; e < jn * kTile; e += kCostThreads) {
              const int64_t j = j0 + e / kTile;
              const double v =
                  ks[j] > 0 ? rn::mul(static_cast<double>(ks[j]), mass_exp(rn::sub(z[j0 * kTile + e], row_max[lane])))
                            : 0.0;
              z[j0 * kTile + e] = v;
              zc[e] = v;
            }
            __syncthreads();
            if (warp == 0)
              for (int64_t jj = 0; jj < jn; ++jj) sum = rn::add(sum, zc[jj * kTile + lane]);
          }
          if (warp == 0) row_sum[lane] = sum;
          const uint32_t* own_bits = rowbits + own_row * W;
          for (int64_t r0 = 0; r0 < R; r0 += kWarps * kTargetsPerWarp) {
            const int64_t rw = r0 + warp * kTargetsPerWarp;  // this warp's first target
            const bool with_own = r0 == 0 && warp == 0;
            double acc[kTargetsPerWarp], own = 0.0;
#pragma unroll
            for (int g = 0; g < kTargetsPerWarp; ++g) acc[g] = 0.0;
            for (int64_t j0 = 0; j0 < Ck; j0 += kChunk) {
              const int64_t jn = min_of<int64_t>(kChunk, Ck - j0);
              __syncthreads();  // row_sum is written; the previous chunk is read
              for (int64_t e = tid; e < jn * kTile; e += kCostThreads) {
                // The first block of targets normalises the weights, later ones read them back.
                const double v = r0 == 0 ? rn::div(z[j0 * kTile + e], row_sum[lane]) : z[j0 * kTile + e];
                if (r0 == 0) z[j0 * kTile + e] = v;
                zc[e] = v;
              }
              __syncthreads();
              const int64_t w0 = j0 / 32, w1 = (j0 + jn + 31) / 32;
#pragma unroll
              for (int g = 0; g < kTargetsPerWarp; ++g)
                if (rw + g < R) acc[g] = masked_sum(rowbits + targets[rw + g] * W, w0, w1, j0, zc, lane, acc[g]);
              if (with_own) own = masked_sum(own_bits, w0, w1, j0, zc, lane, own);
            }
            if (with_own) own_mass[lane] = own;
            __syncthreads();
#pragma unroll
            for (int g = 0; g < kTargetsPerWarp; ++g)
              if (rw + g < R) cost[(rw + g) * kTile + lane] = allowed(rn::sub(own_mass[lane], acc[g]));
          }
        } else {
          for (int64_t e = tid; e < R * kTile; e += kCostThreads) cost[e] = allowed(0.0);  // no key: every cost is 0
        }
        __syncthreads();
        // Each candidate's kk cheapest targets (ties by lower index), one warp per candidate.
        rank_targets(
            warp, count, kWarps, static_cast<int>(R), kk,
            [=](int i, int r) { return cost[static_cast<int64_t>(r) * kTile + i]; },
            w.cand_idx + bh * dims.Pb * dims.kk + first * kk, w.cand_cost + bh * dims.Pb * dims.kk + first * kk);
      });
}

struct PrefilterKernel {
  template <typename T, bool kVec>
  static auto get() {
    return &prefilter_kernel<T, kVec>;
  }
};
struct MassKernel {
  template <typename T, bool kVec>
  static auto get() {
    return &mass_kernel<T, kVec>;
  }
};

// Launches Kernel::get<T, kVec>() for q's dtype and the row reads, raising its shared-memory ceiling.
template <class Kernel>
void launch(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, size_t smem, cudaStream_t stream) {
  dispatch_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto kernel = in.vector_rows ? Kernel::template get<T, true>() : Kernel::template get<T, false>();
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(smem));
    kernel<<<static_cast<unsigned>(dims.blocks), kCostThreads, smem, stream>>>(in, dims, w);
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

void launch_prefilter(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream) {
  launch<PrefilterKernel>(in, dims, w, dtype, (kTile * dims.D + kTile + kRowLanes * kTile) * sizeof(float), stream);
}

void launch_mass_cost(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream) {
  launch<MassKernel>(in, dims, w, dtype,
                     (kChunk + kWarps + 3) * kTile * sizeof(double) + kTile * dims.D * sizeof(float), stream);
}

}  // namespace sapattn::cuda::qround
