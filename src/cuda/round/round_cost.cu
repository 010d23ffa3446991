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
// time (L1 hits after the first).
#include <cfloat>

#include "core/round_arithmetic.hpp"
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

// This block's tiles of a head's list of `total` points (every gridDim.x-th tile): loads each into
// xs, then f(first, count) between two barriers.
template <typename T, class F>
__device__ void for_each_tile(const CostInputs& in, const Dims& dims, int64_t bh, const int32_t* list, int64_t total,
                              float* xs, F&& f) {
  for (int64_t first = blockIdx.x * int64_t{kTile}; first < total; first += gridDim.x * int64_t{kTile}) {
    const int count = static_cast<int>(min_of<int64_t>(kTile, total - first));
    load_tile<T>(in.q, bh / dims.H, bh % dims.H, list + first, count, xs);
    __syncthreads();
    f(first, count);
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
  const int64_t bh = blockIdx.y;
  const HeadInfo info = w.info[bh];
  if (!info.active) return;
  const int64_t D = dims.D, C = dims.C, N = dims.N;
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);  // [kTile][D]
  float* own = xs + kTile * D;                  // [kTile]
  float* partial = own + kTile;                 // [kRowLanes][kTile]
  const float* qc = in.qc + bh * C * D;
  const float* c2 = w.c2 + bh * C;
  const int32_t* targets = w.targets + bh * C;
  const int32_t* pts0 = w.pts0 + bh * N;
  const int32_t* labels = head_labels(in, bh, dims.H);
  float* best = w.best + bh * N;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kRowLanes, group = tid / kRowLanes;
  for_each_tile<T>(in, dims, bh, pts0, info.P0, xs, [&](int64_t first, int count) {
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
      best[first + tid] = b;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Mass cost and ranking.
// ---------------------------------------------------------------------------------------------

// sum of z[j][lane] over the set bits j of a mask row, in ascending j.
__device__ __forceinline__ double masked_sum(const uint32_t* bits, int64_t words, const double* z, int lane) {
  double s = 0.0;
  for (int64_t wd = 0; wd < words; ++wd) {
    uint32_t m = bits[wd];
    while (m != 0) {
      const int64_t j = wd * 32 + __ffs(m) - 1;
      m &= m - 1;
      s = rn::add(s, z[j * kTile + lane]);
    }
  }
  return s;
}

// (a, ra) before (b, rb): by cost, then target index. Costs are never NaN here.
__device__ __forceinline__ bool before(double a, int ra, double b, int rb) { return a < b || (a == b && ra < rb); }

template <typename T, bool kVec>
__global__ void __launch_bounds__(kCostThreads) mass_kernel(CostInputs in, Dims dims, Work w) {
  const int64_t bh = blockIdx.y;
  const HeadInfo info = w.info[bh];
  if (!info.active) return;
  const int64_t D = dims.D, C = dims.C, Ck = dims.Ck, W = dims.W, kk = info.kk;
  extern __shared__ double smem8[];
  double* row_max = smem8;                                  // [kTile]
  double* row_sum = row_max + kTile;                        // [kTile]
  double* own_mass = row_sum + kTile;                       // [kTile]
  float* xs = reinterpret_cast<float*>(own_mass + kTile);   // [kTile][D]
  const int64_t slot = bh * kBlocksPerHead + blockIdx.x;
  double* z = w.tile_z + slot * kTile * Ck;     // [Ck][kTile]
  double* cost = w.tile_cost + slot * kTile * C;  // [R][kTile]
  const float* kc = in.kc + bh * Ck * D;
  const int32_t* ks = in.ks + bh * Ck;
  const int32_t* targets = w.targets + bh * C;
  const uint32_t* rowbits = w.rowbits + bh * C * W;
  const int32_t* pts = w.pts + bh * dims.Pb;
  const int32_t* donor = w.donor + bh * dims.Pb;
  int32_t* cand_idx = w.cand_idx + bh * dims.Pb * dims.kk;
  double* cand_cost = w.cand_cost + bh * dims.Pb * dims.kk;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  constexpr int kWarps = kCostThreads / 32;
  const float scale = dims.scale;
  const double max_cost = dims.max_cost;
  const auto allowed = [&](double c) { return c != c || c > max_cost ? static_cast<double>(INFINITY) : c; };
  for_each_tile<T>(in, dims, bh, pts, info.P, xs, [&](int64_t first, int count) {
    if (info.any_key) {
      double* zg = z + (tid / kRowLanes) * kGroup;  // this thread's group of candidates
      tile_dots<kVec>(
          xs, D, Ck, [=](int64_t j) { return kc + j * D; },
          [=](int64_t j, int k, float dot) { zg[j * kTile + k] = static_cast<double>(rn::mul(scale, dot)); });
      __syncthreads();
      // Softmax over the non-empty key clusters, one lane per candidate in the CPU's order of j.
      if (warp == 0) {
        double m = -INFINITY;
        for (int64_t j = 0; j < Ck; ++j)
          if (ks[j] > 0) m = m < z[j * kTile + lane] ? z[j * kTile + lane] : m;  // std::max: NaN never wins
        row_max[lane] = m;
      }
      __syncthreads();
      for (int64_t e = tid; e < Ck * kTile; e += kCostThreads) {
        const int64_t j = e / kTile;
        z[e] = ks[j] > 0 ? rn::mul(static_cast<double>(ks[j]), mass_exp(rn::sub(z[e], row_max[e % kTile]))) : 0.0;
      }
      __syncthreads();
      if (warp == 0) {
        double s = 0.0;
        for (int64_t j = 0; j < Ck; ++j) s = rn::add(s, z[j * kTile + lane]);
        row_sum[lane] = s;
      }
      __syncthreads();
      for (int64_t e = tid; e < Ck * kTile; e += kCostThreads) z[e] = rn::div(z[e], row_sum[e % kTile]);
      __syncthreads();
      if (warp == 0) {
        const int64_t own = lane < count ? donor[first + lane] : 0;
        own_mass[lane] = masked_sum(rowbits + own * W, W, z, lane);
      }
      __syncthreads();
      for (int64_t r = warp; r < info.R; r += kWarps)
        cost[r * kTile + lane] = allowed(rn::sub(own_mass[lane], masked_sum(rowbits + targets[r] * W, W, z, lane)));
    } else {
      for (int64_t e = tid; e < info.R * kTile; e += kCostThreads) cost[e] = allowed(0.0);  // no key: every cost is 0
    }
    __syncthreads();
    // Each candidate's kk cheapest targets (ties by lower index), one warp per candidate: kk rounds
    // of a warp minimum over the (cost, r) pairs after the last one taken.
    for (int i = warp; i < count; i += kWarps) {
      double prev_c = -INFINITY;
      int prev_r = -1;
      for (int64_t k = 0; k < kk; ++k) {
        double bc = INFINITY;
        int br = -1;
        for (int r = lane; r < info.R; r += 32) {
          const double c = cost[static_cast<int64_t>(r) * kTile + i];
          if (before(prev_c, prev_r, c, r) && (br < 0 || before(c, r, bc, br))) bc = c, br = r;
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) {
          const double oc = __shfl_xor_sync(0xffffffffu, bc, off);
          const int orr = __shfl_xor_sync(0xffffffffu, br, off);
          if (orr >= 0 && (br < 0 || before(oc, orr, bc, br))) bc = oc, br = orr;
        }
        if (lane == 0) {
          cand_idx[(first + i) * kk + k] = br;
          cand_cost[(first + i) * kk + k] = bc;
        }
        prev_c = bc, prev_r = br;
      }
    }
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
    const dim3 grid(kBlocksPerHead, static_cast<unsigned>(dims.BH));
    kernel<<<grid, kCostThreads, smem, stream>>>(in, dims, w);
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

void launch_prefilter(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream) {
  launch<PrefilterKernel>(in, dims, w, dtype, (kTile * dims.D + kTile + kRowLanes * kTile) * sizeof(float), stream);
}

void launch_mass_cost(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream) {
  launch<MassKernel>(in, dims, w, dtype, 3 * kTile * sizeof(double) + kTile * dims.D * sizeof(float), stream);
}

}  // namespace sapattn::cuda::qround
