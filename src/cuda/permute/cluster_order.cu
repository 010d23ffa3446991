// order_clusters on the GPU: the greedy nearest-neighbour chain of include/sapattn/ops.hpp, bit for
// bit the CPU reference's (src/cpu/cluster_order.cpp), then a kernel that moves centroids and sizes
// to their new numbers and one that remaps the labels (microseconds; the chain is the cost).
//
// The chain is sequential: per head, up to C steps, each scoring every unvisited non-empty cluster
// against the current one (a D-long dot product) and taking the best. Its time is the steps' latency
// times their count, so a head's centroids stay on chip and a step is kept short. Two kernels build
// it by default, a third on request; order_chain_kernel() says which one runs (one function answers
// "supported?" and "which?"):
//
// Cluster kernel (sm_90+, D <= 128, C <= 8 x 352 = 2816 at D > 64 and 8 x 512 = 4096 at D <= 64, and
// a device that gives a CTA the shared memory for its rows, up to 196 KB: an H100 gives 227 KB): one
// thread-block cluster of K CTAs per head, one thread per candidate holding its row in registers,
// padded with zeros to kD = 64 or 128 (chain_arithmetic.hpp: the reference's warp butterfly as one
// thread evaluates it, host-tested against the reference in tests/test_cluster_order.cpp). A step:
//   1. every thread scores its candidate against the current row, which sits in its CTA's shared
//      memory (the same address in every lane: broadcast loads): kD fmas, 31 adds, 2 multiplies;
//   2. the warp's best by two redux.sync on (key, index), the CTA's best by warp 0 after one
//      __syncthreads;
//   3. warp 0 writes that best (key, index, inverse norm, and the row, from a padded copy of the CTA's
//      rows in shared memory) into slot [step % 2][rank] of every CTA of the cluster (DSMEM);
//   4. one cluster barrier; every thread reads the K slots and takes the same winner, whose row in
//      its own CTA's slot is the next step's current row.
// A CTA writes a slot buffer again two steps later, after a barrier that no CTA passes before it is
// done reading that buffer, so the two buffers need no other synchronisation. Registers bound the
// CTA: a thread holds its row (kD), 32 lane sums and a few more, 168 registers at kD = 128 (ptxas,
// no spills), so 352 threads (11 warps, a cap of 184) fill an SM's 64K registers; 512 threads at
// kD = 64 (124 registers, a cap of 128). K = ceil(C / that), the CTA's threads ceil(C / K) rounded up
// to a warp: at [1,40,1000,128], K = 3 CTAs of 352 threads, 120 CTAs on 132 SMs.
//
// Estimate at [1,40,1000,128] on an H100 (NOT YET MEASURED: no GPU where this was written): a step is
// ~650 cycles of scoring (per warp ~215 instructions: 32 broadcast 16-byte loads, 128 fmas, 31 adds,
// the key and two redux; 3 warps per scheduler) plus ~600 cycles of argmax, DSMEM writes, cluster
// barrier and winner read (assuming ~200 cycles per SM-to-SM hop), ~1250 cycles = 0.7 us at 1.75 GHz;
// about 800 steps (a fifth of the clusters empty) to 1001 steps: 0.6-0.7 ms, plus ~10 us to load the
// rows. If the GPU cannot hold 40 clusters of 3 CTAs at once (a cluster stays inside one GPC), the
// heads left over run in a second wave: up to ~1.4 ms. The goal is <= 2 ms; the 37 ms below was
// measured. The knob set_order_chain_override("cluster:256") caps CTAs at 256 threads (K = 4 at
// C = 1000: shorter steps, 160 CTAs) for measuring the other side of that trade.
//
// Block kernel (any other shape or GPU, or the knob "block"): one block per head, a warp per
// candidate (lane l sums dimensions l, l + 32, ..., then a xor-shuffle butterfly), the centroids read
// from global memory every step: 37 ms at [1,40,1000,128] on an H100 (latency-bound: a dependent
// shuffle reduction per candidate).
//
// Matrix kernels (only with the knob "matrix", C <= 8192 and D <= 128; chain_matrix.cu): every C x C
// similarity key of a head in the cluster kernel's arithmetic first, then one CTA per head walks the
// chain over them, a step with no cross-SM barrier. Workspace: 4 C (C + 1) bytes more per head.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/carver.hpp"
#include "core/cuda_check.hpp"
#include "cuda/backend.hpp"
#include "cuda/permute/chain_arithmetic.hpp"
#include "cuda/permute/chain_matrix.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

constexpr int kChainThreads = 256;
constexpr int kChainWarps = kChainThreads / 32;
constexpr int kRemapThreads = 256;
// The block kernel keeps the inverse norms (f32) and visited flags (u8) of a head in shared memory.
constexpr int64_t kBlockKernelSmemLimit = 200 * 1024;

// ---------------------------------------------------------------------------------------------
// Cluster kernel
// ---------------------------------------------------------------------------------------------

constexpr int kMaxClusterCtas = 8;  // the portable cluster size

// Threads per CTA at most: the registers of a thread (its row, 32 lane sums, a few more: 168 at
// kD = 128, 124 at kD = 64) times the threads fill the SM's 64K registers at one CTA per SM.
template <int kD>
constexpr int kClusterThreads = kD == 128 ? 352 : 512;

// Row stride of the CTA's copy of its rows, in floats: thread t's 16-byte loads of row t fall in
// distinct banks within each quarter warp (4t + 4j mod 32 words for t = 0..7).
template <int kD>
constexpr int kRowStride = kD + 4;

// One CTA's best candidate of a step, as written into every CTA of the cluster.
template <int kD>
struct alignas(16) Slot {
  uint32_t key;  // chain::order_key of its similarity; chain::kNoCandidate: the CTA has none left
  int32_t index;
  float inv_norm;
  float unused;
  float row[kD];
};

// Shared memory of a CTA: rows [threads][kRowStride], inverse norms [threads], slots [2][ctas],
// warp results [warps] (uint2).
template <int kD>
constexpr size_t cluster_smem_bytes(int threads, int ctas) {
  return sizeof(float) * (static_cast<size_t>(threads) * kRowStride<kD> + round_up(threads, 4)) +
         2 * static_cast<size_t>(ctas) * sizeof(Slot<kD>) + static_cast<size_t>(threads / 32) * sizeof(uint2);
}
// The largest clusters fit the 227 KB a CTA may have on sm_90.
static_assert(cluster_smem_bytes<128>(kClusterThreads<128>, kMaxClusterCtas) <= 227 * 1024);
static_assert(cluster_smem_bytes<64>(kClusterThreads<64>, kMaxClusterCtas) <= 227 * 1024);

// Grid (K, B*H), clusters of (K, 1, 1): CTA `rank` of head bh holds clusters rank * T .. rank * T + T - 1.
template <int kD>
__global__ void __launch_bounds__(kClusterThreads<kD>, 1)
    chain_cluster_kernel(const float* centroids, const int32_t* sizes, int C, int D, int32_t* rank_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const int ctas = static_cast<int>(cluster.num_blocks()), me = static_cast<int>(cluster.block_rank());
  const int threads = static_cast<int>(blockDim.x), t = static_cast<int>(threadIdx.x);
  const int warp = t / 32, lane = t % 32, warps = threads / 32;
  const int64_t bh = blockIdx.y;
  const int first = me * threads;  // this CTA's clusters: first .. first + count - 1
  const int count = max(0, min(threads, C - first));
  extern __shared__ __align__(16) unsigned char smem[];
  float* rows = reinterpret_cast<float*>(smem);
  float* inv = rows + threads * kRowStride<kD>;
  auto* slots = reinterpret_cast<Slot<kD>*>(inv + round_up(threads, 4));
  auto* warp_best = reinterpret_cast<uint2*>(slots + 2 * ctas);

  // The CTA's rows, zero-padded to kD, into shared memory (coalesced reads), then each thread's own
  // row into registers.
  const float* src = centroids + (bh * C + first) * int64_t{D};
  for (int i = t; i < count * kD; i += threads) {
    const int r = i / kD, d = i % kD;
    rows[r * kRowStride<kD> + d] = d < D ? src[int64_t{r} * D + d] : 0.0f;
  }
  __syncthreads();
  const bool mine = t < count;
  const int c = first + t;
  float row[kD];
#pragma unroll
  for (int j = 0; j < kD / 4; ++j) {
    const float4 v = mine ? reinterpret_cast<const float4*>(rows + t * kRowStride<kD>)[j] : make_float4(0, 0, 0, 0);
    row[4 * j] = v.x;
    row[4 * j + 1] = v.y;
    row[4 * j + 2] = v.z;
    row[4 * j + 3] = v.w;
  }
  const float inv_self = chain::inverse_norm(chain::squared_norm<kD>(row));
  inv[t] = inv_self;
  const int32_t* size = sizes + bh * C;
  bool alive = mine && size[c] != 0;  // non-empty and not yet in the chain

  // Empty clusters take the last ranks in index order: (non-empty clusters) + (empty ones before c).
  int empty_total = 0, empty_before_cta = 0;
  for (int i0 = 0; i0 < C; i0 += threads) {
    const int i = i0 + t;
    const bool empty = i < C && size[i] == 0;
    empty_total += __syncthreads_count(empty);
    empty_before_cta += __syncthreads_count(empty && i < first);
  }
  const bool empty_mine = mine && size[c] == 0;
  const unsigned empty_lanes = __ballot_sync(0xffffffffu, empty_mine);
  if (lane == 0) warp_best[warp].x = static_cast<unsigned>(__popc(empty_lanes));
  __syncthreads();
  if (empty_mine) {
    int before = empty_before_cta + __popc(empty_lanes & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) before += static_cast<int>(warp_best[w].x);
    rank_out[bh * C + c] = C - empty_total + before;
  }
  // Every CTA of the cluster has started and filled its shared memory before anyone writes into it;
  // the barrier also orders the reads of warp_best above before the chain's writes.
  cluster.sync();

  int cur = 0;  // the slot (buffer * ctas + rank) that holds the current cluster's row
  float inv_cur = 0.0f;
  for (int step = 0;; ++step) {
    const int buffer = (step % 2) * ctas;
    // 1. This thread's key. Step 0 has no current cluster: every live candidate gets the same key and
    //    the lowest index wins, the reference's first non-empty cluster.
    uint32_t key = chain::kNoCandidate;
    if (alive) {
      if (step == 0) {
        key = 1;
      } else {
        const float4* cur_row = reinterpret_cast<const float4*>(slots[cur].row);
        const float dot = chain::dot<kD>(row, [&](int j, float(&q)[4]) {
          const float4 v = cur_row[j];
          q[0] = v.x;
          q[1] = v.y;
          q[2] = v.z;
          q[3] = v.w;
        });
        key = chain::order_key(chain::similarity(dot, inv_cur, inv_self));
      }
    }
    // 2. The warp's best (largest key, then lowest index), then the CTA's, by warp 0.
    const uint32_t warp_key = __reduce_max_sync(0xffffffffu, key);
    const uint32_t warp_index = __reduce_min_sync(0xffffffffu, key == warp_key ? static_cast<uint32_t>(c) : ~0u);
    if (lane == 0) warp_best[warp] = make_uint2(warp_key, warp_index);
    __syncthreads();
    if (warp == 0) {
      const uint2 w = lane < warps ? warp_best[lane] : make_uint2(chain::kNoCandidate, ~0u);
      const uint32_t best_key = __reduce_max_sync(0xffffffffu, w.x);
      const uint32_t best_index = __reduce_min_sync(0xffffffffu, w.x == best_key ? w.y : ~0u);
      const bool found = best_key != chain::kNoCandidate;
      const int local = found ? static_cast<int>(best_index) - first : 0;
      float4 part = make_float4(0, 0, 0, 0);
      if (found && lane < kD / 4) part = reinterpret_cast<const float4*>(rows + local * kRowStride<kD>)[lane];
      const float inv_best = found ? inv[local] : 0.0f;
      // 3. Into slot `me` of this step's buffer in every CTA, this one included.
      for (int r = 0; r < ctas; ++r) {
        Slot<kD>* to = cluster.map_shared_rank(slots + buffer + me, static_cast<unsigned>(r));
        if (lane < kD / 4) reinterpret_cast<float4*>(to->row)[lane] = part;
        if (lane == 0) {
          to->key = best_key;
          to->index = static_cast<int32_t>(best_index);
          to->inv_norm = inv_best;
        }
      }
    }
    // 4. The cluster's best. CTA r holds lower indices than CTA r + 1, so on equal keys the first
    //    CTA in rank order has the lower index: a strict comparison keeps it.
    cluster.sync();
    uint32_t best_key = chain::kNoCandidate;
    int best = buffer;
    for (int r = 0; r < ctas; ++r)
      if (slots[buffer + r].key > best_key) {
        best_key = slots[buffer + r].key;
        best = buffer + r;
      }
    if (best_key == chain::kNoCandidate) break;  // every CTA reads the same slots: all leave together
    cur = best;
    inv_cur = slots[best].inv_norm;
    if (alive && c == slots[best].index) {
      alive = false;
      rank_out[bh * C + c] = step;
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched: order_chain_kernel() takes it only where sm_90 code was built
#endif
}

// ---------------------------------------------------------------------------------------------
// Block kernel
// ---------------------------------------------------------------------------------------------

// The dot product of rows a and b of length D, the same value in every lane.
__device__ __forceinline__ float warp_dot(const float* a, const float* b, int64_t D, int lane) {
  float s = 0.0f;
  for (int64_t d = lane; d < D; d += 32) s = __fmaf_rn(a[d], b[d], s);
#pragma unroll
  for (int m = 16; m > 0; m /= 2) s = __fadd_rn(s, __shfl_xor_sync(0xffffffff, s, m));
  return s;
}

struct Best {
  float sim;
  int32_t index;  // -1: none
};
// The better of two candidates: higher similarity, then the lower index.
__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  return b.sim > a.sim || (b.sim == a.sim && b.index < a.index) ? b : a;
}

// Shared memory: inverse norms [C] f32, then the visited flags [C] u8.
__global__ void __launch_bounds__(kChainThreads)
    chain_block_kernel(const float* centroids, const int32_t* sizes, int64_t C, int64_t D, int32_t* rank_out) {
  extern __shared__ float inv[];
  auto* used = reinterpret_cast<uint8_t*>(inv + C);
  __shared__ Best warp_best[kChainWarps];
  __shared__ int32_t current, position;
  const int64_t bh = blockIdx.x;
  const float* cent = centroids + bh * C * D;
  const int32_t* size = sizes + bh * C;
  int32_t* rank = rank_out + bh * C;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t c = warp; c < C; c += kChainWarps) {
    const float n = warp_dot(cent + c * D, cent + c * D, D, lane);
    if (lane == 0) inv[c] = n > 0.0f ? __frcp_rn(__fsqrt_rn(n)) : 0.0f;
  }
  for (int64_t c = threadIdx.x; c < C; c += kChainThreads) used[c] = size[c] == 0 ? 1 : 0;
  if (threadIdx.x == 0) {
    int32_t first = 0;
    while (first < C && size[first] == 0) ++first;
    current = first;
    position = 0;
  }
  __syncthreads();
  while (current < C) {
    const int32_t cur = current;
    if (threadIdx.x == 0) {
      used[cur] = 1;
      rank[cur] = position++;
    }
    __syncthreads();
    Best best{0.0f, -1};
    for (int64_t c = warp; c < C; c += kChainWarps) {
      if (used[c]) continue;
      float sim = __fmul_rn(__fmul_rn(warp_dot(cent + cur * D, cent + c * D, D, lane), inv[cur]), inv[c]);
      if (isnan(sim)) sim = -INFINITY;
      best = better(best, Best{sim, static_cast<int32_t>(c)});
    }
    if (lane == 0) warp_best[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      Best all = warp_best[0];
      for (int w = 1; w < kChainWarps; ++w) all = better(all, warp_best[w]);
      current = all.index < 0 ? static_cast<int32_t>(C) : all.index;
    }
    __syncthreads();
  }
  // Empty clusters last, in index order.
  if (threadIdx.x == 0) {
    int32_t p = position;
    for (int64_t c = 0; c < C; ++c)
      if (size[c] == 0) rank[c] = p++;
  }
}

// ---------------------------------------------------------------------------------------------
// Moving the clusters to their ranks
// ---------------------------------------------------------------------------------------------

// Moves centroid rows and sizes to their ranks (from the copies in the workspace).
__global__ void move_kernel(const float* old_centroids, const int32_t* old_sizes, const int32_t* rank, int64_t C,
                            int64_t D, float* centroids, int32_t* sizes) {
  const int64_t bh = blockIdx.y;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const int64_t to = rank[bh * C + c];
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
      centroids[(bh * C + to) * D + d] = old_centroids[(bh * C + c) * D + d];
    if (threadIdx.x == 0) sizes[bh * C + to] = old_sizes[bh * C + c];
  }
}

// labels[i] = rank[labels[i]]; a label outside [0, C) raises kBadLabel and is left as it is.
__global__ void remap_kernel(int32_t* labels, int64_t stride_b, int64_t stride_h, int64_t heads, int64_t N,
                             const int32_t* rank, int64_t C, int* flag) {
  const int64_t bh = blockIdx.y;
  int32_t* row = labels + (bh / heads) * stride_b + (bh % heads) * stride_h;
  for (int64_t i = blockIdx.x * int64_t{kRemapThreads} + threadIdx.x; i < N; i += int64_t{gridDim.x} * kRemapThreads) {
    const int32_t l = row[i];
    if (l < 0 || l >= C) {
      atomicOr(flag, kBadLabel);
      continue;
    }
    row[i] = rank[bh * C + l];
  }
}

struct OrderScratch {
  int32_t* rank = nullptr;
  float* centroids = nullptr;
  int32_t* sizes = nullptr;
  chain_matrix::Scratch matrix;  // carved only for the matrix kernels
};

OrderScratch carve_order(Carver& carver, int64_t batch_heads, int64_t clusters, int64_t dim, bool matrix) {
  OrderScratch s;
  s.rank = carver.take<int32_t>(batch_heads * clusters);
  s.centroids = carver.take<float>(batch_heads * clusters * dim);
  s.sizes = carver.take<int32_t>(batch_heads * clusters);
  if (matrix) s.matrix = chain_matrix::carve(carver, batch_heads, clusters);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Kernel choice
// ---------------------------------------------------------------------------------------------

// kDefaultChain: the default (the matrix kernels where they fit, else the cluster kernel, else the
// block kernel); kBlockChain: the block kernel; kClusterChain: the cluster kernel where it fits; n > 0:
// the cluster kernel with at most n threads per CTA; kMatrixChain: the matrix kernels where they fit.
constexpr int kDefaultChain = -1, kBlockChain = 0, kMatrixChain = -2, kClusterChain = -3;
// The default takes the matrix kernels up to this many clusters: their keys are 4 C (C + 1) bytes per
// head, 16 MB at 2048 (4 MB at SVG2's 1000), beyond which the workspace, not the chain, dominates.
constexpr int64_t kDefaultMatrixClusters = 2048;

// Whether the knob `forced` runs the matrix kernels at C clusters of dimension D.
bool matrix_chain(int forced, int64_t clusters, int64_t dim) {
  if (!chain_matrix::fits(clusters, dim)) return false;
  return forced == kMatrixChain || (forced == kDefaultChain && clusters <= kDefaultMatrixClusters);
}
std::atomic<int> g_chain_override{kDefaultChain};

int parse_chain_override(const char* name) {
  if (name == nullptr || name[0] == '\0') return kDefaultChain;
  if (std::strcmp(name, "block") == 0) return kBlockChain;
  if (std::strcmp(name, "matrix") == 0) return kMatrixChain;
  if (std::strcmp(name, "cluster") == 0) return kClusterChain;
  if (std::strncmp(name, "cluster:", 8) == 0) {
    char* end = nullptr;
    const long n = std::strtol(name + 8, &end, 10);
    if (end != name + 8 && *end == '\0' && n >= 32 && n % 32 == 0 && n <= kClusterThreads<64>)
      return static_cast<int>(n);
  }
  SAPATTN_THROW(InvalidArgumentError, "unknown order_clusters kernel override '", name,
                "' (expected \"block\", \"matrix\", \"cluster\", \"cluster:N\" with N a multiple of 32 up to ",
                kClusterThreads<64>,
                ", or \"\")");
}

// The shared memory a CTA of the cluster kernel may have on `device`, or 0 where the kernel cannot run:
// no thread-block clusters (before sm_90), or no sm_90 code in this build (an sm_80-only build
// JIT-compiled for an H100 has the kernel's empty body). Consumer GPUs with 99 KB per CTA take the
// block kernel.
size_t cluster_kernel_smem(int device) {
  int major = 0, smem = 0;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return 0;
  cudaFuncAttributes attr{};
  SAPATTN_CUDA_CHECK(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(chain_cluster_kernel<128>)));
  if (attr.ptxVersion < 90) return 0;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(smem);
}

template <int kD>
void launch_cluster_kernel(const OrderChainKernel& k, const float* centroids, const int32_t* sizes, int64_t BH,
                           int64_t C, int64_t D, int32_t* rank, cudaStream_t st) {
  const void* kernel = reinterpret_cast<const void*>(chain_cluster_kernel<kD>);
  set_max_dynamic_smem(kernel, static_cast<int>(k.smem));
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(k.ctas), static_cast<unsigned>(BH));
  config.blockDim = dim3(static_cast<unsigned>(k.threads));
  config.dynamicSmemBytes = k.smem;
  config.stream = st;
  cudaLaunchAttribute cluster_dims[1];
  cluster_dims[0].id = cudaLaunchAttributeClusterDimension;
  cluster_dims[0].val.clusterDim.x = static_cast<unsigned>(k.ctas);
  cluster_dims[0].val.clusterDim.y = 1;
  cluster_dims[0].val.clusterDim.z = 1;
  config.attrs = cluster_dims;
  config.numAttrs = 1;
  SAPATTN_CUDA_CHECK(cudaLaunchKernelEx(&config, chain_cluster_kernel<kD>, centroids, sizes, static_cast<int>(C),
                                        static_cast<int>(D), rank));
}

}  // namespace

OrderChainKernel order_chain_kernel(int device, int64_t clusters, int64_t dim) {
  OrderChainKernel k;
  const int forced = g_chain_override.load();
  // The matrix kernels by default and on request; outside their shapes the cluster kernel, else the
  // block kernel. (Run 18: 1.52 ms against the cluster kernel's 2.74 at [1,40,1000,128], the same
  // bits; their keys take 4 C (C + 1) bytes of workspace per head.)
  if (matrix_chain(forced, clusters, dim)) {
    k.matrix = true;
    k.padded_dim = dim <= 64 ? 64 : 128;
    k.threads = chain_matrix::chain_threads(clusters);
    return k;
  }
  const size_t smem_limit =
      forced != kBlockChain && clusters >= 1 && dim >= 1 && dim <= 128 ? cluster_kernel_smem(device) : 0;
  if (smem_limit > 0) {
    const int padded = dim <= 64 ? 64 : 128;
    int most = padded == 128 ? kClusterThreads<128> : kClusterThreads<64>;
    if (forced > 0) most = min_of(most, forced);
    const int64_t ctas = ceil_div(clusters, most);
    const int threads = static_cast<int>(round_up(ceil_div(clusters, ctas), 32));
    const size_t smem = padded == 128 ? cluster_smem_bytes<128>(threads, static_cast<int>(ctas))
                                      : cluster_smem_bytes<64>(threads, static_cast<int>(ctas));
    if (ctas <= kMaxClusterCtas && smem <= smem_limit) {
      k.cluster = true;
      k.padded_dim = padded;
      k.ctas = static_cast<int>(ctas);
      k.threads = threads;
      k.smem = smem;
      return k;
    }
  }
  k.threads = kChainThreads;
  k.smem = static_cast<size_t>(clusters) * (sizeof(float) + 1);
  k.supported = static_cast<int64_t>(k.smem) <= kBlockKernelSmemLimit;
  return k;
}

void set_order_chain_override(const char* name) { g_chain_override.store(parse_chain_override(name)); }

// The matrix kernels' share where they run (the knob is read now: set it before sizing the
// workspace, or order_clusters throws WorkspaceError). Their choice depends on no device property.
size_t order_clusters_workspace_bytes(int64_t batch_heads, int64_t clusters, int64_t dim) {
  Carver carver("order_clusters");
  carve_order(carver, batch_heads, clusters, dim, matrix_chain(g_chain_override.load(), clusters, dim));
  return carver.used();
}

void order_clusters(TensorView centroids, TensorView sizes, TensorView labels, const Stream& stream,
                    Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const int64_t B = centroids.shape[0], H = centroids.shape[1], C = centroids.shape[2], D = centroids.shape[3];
  const int64_t BH = B * H, N = labels.shape[2];
  const OrderChainKernel k = order_chain_kernel(stream.device.index, C, D);
  Carver carver("order_clusters", workspace);
  const OrderScratch s = carve_order(carver, BH, C, D, k.matrix);
  carver.check();
  if (BH == 0 || C == 0) return;
  SAPATTN_CHECK(k.supported, UnsupportedError, "order_clusters on CUDA takes at most ",
                kBlockKernelSmemLimit / static_cast<int64_t>(sizeof(float) + 1), " clusters, got ", C);
  SAPATTN_CHECK(BH < (int64_t{1} << 16), UnsupportedError, "order_clusters on CUDA takes fewer than 65536 heads, got ",
                BH);
  const cudaStream_t st = stream_of(stream);
  const bool checked = begin_value_check(stream);
  const auto* cent = static_cast<const float*>(centroids.data);
  const auto* size = static_cast<const int32_t*>(sizes.data);
  if (k.matrix) {
    chain_matrix::build_chain(cent, size, BH, C, D, s.matrix, s.rank, st);
  } else if (k.cluster && k.padded_dim == 128) {
    launch_cluster_kernel<128>(k, cent, size, BH, C, D, s.rank, st);
  } else if (k.cluster) {
    launch_cluster_kernel<64>(k, cent, size, BH, C, D, s.rank, st);
  } else {
    set_max_dynamic_smem(reinterpret_cast<const void*>(chain_block_kernel), static_cast<int>(k.smem));
    chain_block_kernel<<<static_cast<unsigned>(BH), kChainThreads, k.smem, st>>>(cent, size, C, D, s.rank);
    SAPATTN_CUDA_CHECK_LAUNCH();
  }
  SAPATTN_CUDA_CHECK(cudaMemcpyAsync(s.centroids, centroids.data, static_cast<size_t>(BH * C * D) * sizeof(float),
                                     cudaMemcpyDeviceToDevice, st));
  SAPATTN_CUDA_CHECK(cudaMemcpyAsync(s.sizes, sizes.data, static_cast<size_t>(BH * C) * sizeof(int32_t),
                                     cudaMemcpyDeviceToDevice, st));
  const dim3 move_grid(static_cast<unsigned>(min_of<int64_t>(C, 1024)), static_cast<unsigned>(BH));
  move_kernel<<<move_grid, 128, 0, st>>>(s.centroids, s.sizes, s.rank, C, D, static_cast<float*>(centroids.data),
                                         static_cast<int32_t*>(sizes.data));
  SAPATTN_CUDA_CHECK_LAUNCH();
  if (N > 0) {
    const dim3 remap_grid(static_cast<unsigned>(min_of<int64_t>(ceil_div(N, kRemapThreads), 1024)),
                          static_cast<unsigned>(BH));
    remap_kernel<<<remap_grid, kRemapThreads, 0, st>>>(static_cast<int32_t*>(labels.data), labels.stride[0],
                                                       labels.stride[1], H, N, s.rank, C, value_error_flag());
    SAPATTN_CUDA_CHECK_LAUNCH();
  }
  if (checked) end_value_check(stream, "order_clusters");
}

}  // namespace sapattn::cuda
