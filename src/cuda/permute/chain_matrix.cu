// order_clusters' chain from a matrix of similarities, the default where it fits (cluster_order.cu
// chooses; run 18: 1.52 ms against the cluster kernel's 2.74). The cluster kernel's step costs ~3 us at
// [1,40,1000,128] on an H100, most likely its cluster barrier and DSMEM round trip; here a step needs
// no cross-SM synchronisation:
//   1. inverse_norm_kernel: every centroid's inverse norm, one thread per row (workspace [BH, C]).
//   2. similarity_kernel: for every head and pair (i, j), the key the cluster kernel computes for
//      candidate j when i is current: chain::dot with j's row in registers and i's row read by
//      broadcast from shared memory, chain::similarity(dot, inv[i], inv[j]), chain::order_key. The same
//      functions on the same zero-padded rows (kD = 64 or 128), so the same bits, and those are
//      host-tested against the CPU reference (tests/test_cluster_order.cpp). The similarity is not
//      symmetric ((dot * inv_i) * inv_j rounds differently from (dot * inv_j) * inv_i), so every
//      ordered pair is computed. Workspace [BH, C, C] u32.
//   3. chain_kernel: one CTA per head. A step loads row `cur` of the keys for the thread's live
//      candidates (unvisited, non-empty) and takes the largest key, then the lowest index: within a
//      thread in ascending index order with a strict comparison, within a warp by two redux.sync,
//      across warps by every warp reducing the warps' results after one __syncthreads.
// Estimate (NOT MEASURED, written without a GPU) at [1,40,1000,128] on an H100: 40 x 10^6 dot
// products of ~170 instructions, ~0.2-0.3 ms on the CUDA cores; a chain step is one dependent load
// (4 KB of a head's 4 MB of keys: 160 MB for 40 heads, more than the L2, so mostly from DRAM) plus
// ~200 cycles of reductions and barrier, ~0.5 us: ~0.5 ms for ~1000 steps.
#include "cuda/permute/chain_arithmetic.hpp"
#include "cuda/permute/chain_matrix.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda::chain_matrix {

namespace {

// Rows (current rows i, and candidates j: one thread each) per similarity CTA. At kD = 128 a thread
// holds its row and 32 lane sums (~170 registers), and a tile of 64 rows is 33 KB of static shared
// memory.
constexpr int kTile = 64;
constexpr int kCandidatesPerThread = 8;
constexpr int kMaxChainThreads = 1024;
static_assert(kMaxClusters == int64_t{kMaxChainThreads} * kCandidatesPerThread);

// Row stride of a tile in floats: thread t's 16-byte loads of row t fall in distinct banks within each
// quarter warp (as the cluster kernel's copy of its rows).
template <int kD>
constexpr int kTileStride = kD + 4;

// Rows first .. first + kTile - 1 of a head [C, D] into `tile`, zero-padded to kD and past C.
template <int kD>
__device__ void load_tile(float (&tile)[kTile][kTileStride<kD>], const float* head, int first, int C, int D) {
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kD; e += kTile) {
    const int r = e / kD, d = e % kD, c = first + r;
    tile[r][d] = c < C && d < D ? head[int64_t{c} * D + d] : 0.0f;
  }
}

// Thread t's row of the tile into registers.
template <int kD>
__device__ __forceinline__ void row_from_tile(const float (&tile)[kTile][kTileStride<kD>], float (&row)[kD]) {
  const auto* src = reinterpret_cast<const float4*>(tile[threadIdx.x]);
#pragma unroll
  for (int j = 0; j < kD / 4; ++j) {
    const float4 v = src[j];
    row[4 * j] = v.x;
    row[4 * j + 1] = v.y;
    row[4 * j + 2] = v.z;
    row[4 * j + 3] = v.w;
  }
}

// Grid (ceil(C / kTile), BH).
template <int kD>
__global__ void __launch_bounds__(kTile) inverse_norm_kernel(const float* centroids, int C, int D, float* inv_norms) {
  __shared__ __align__(16) float tile[kTile][kTileStride<kD>];
  const int64_t bh = blockIdx.y;
  const int first = static_cast<int>(blockIdx.x) * kTile, c = first + static_cast<int>(threadIdx.x);
  load_tile<kD>(tile, centroids + bh * C * D, first, C, D);
  __syncthreads();
  float row[kD];
  row_from_tile<kD>(tile, row);
  if (c < C) inv_norms[bh * C + c] = chain::inverse_norm(chain::squared_norm<kD>(row));
}

// Grid (ceil(C / kTile) candidate tiles, ceil(C / kTile) current-row tiles, BH): keys[bh][i][j] for
// the CTA's kTile x kTile pairs, one thread per candidate j.
template <int kD>
__global__ void __launch_bounds__(kTile)
    similarity_kernel(const float* centroids, const float* inv_norms, int C, int D, uint32_t* keys) {
  __shared__ __align__(16) float tile[kTile][kTileStride<kD>];
  __shared__ float inv_tile[kTile];
  const int64_t bh = blockIdx.z;
  const int t = static_cast<int>(threadIdx.x);
  const int j = static_cast<int>(blockIdx.x) * kTile + t, first_i = static_cast<int>(blockIdx.y) * kTile;
  const float* head = centroids + bh * C * D;
  const float* inv = inv_norms + bh * C;
  // The candidates' rows into registers through the tile, then the current rows into the tile.
  load_tile<kD>(tile, head, static_cast<int>(blockIdx.x) * kTile, C, D);
  __syncthreads();
  float row[kD];
  row_from_tile<kD>(tile, row);
  __syncthreads();
  load_tile<kD>(tile, head, first_i, C, D);
  inv_tile[t] = first_i + t < C ? inv[first_i + t] : 0.0f;
  __syncthreads();
  if (j >= C) return;
  const float inv_j = inv[j];
  uint32_t* out = keys + (bh * C + first_i) * C + j;
  const int rows = min(kTile, C - first_i);
  for (int r = 0; r < rows; ++r) {
    const auto* cur = reinterpret_cast<const float4*>(tile[r]);
    const float dot = chain::dot<kD>(row, [&](int q4, float(&q)[4]) {
      const float4 v = cur[q4];  // the same address in every lane: a broadcast
      q[0] = v.x;
      q[1] = v.y;
      q[2] = v.z;
      q[3] = v.w;
    });
    out[int64_t{r} * C] = chain::order_key(chain::similarity(dot, inv_tile[r], inv_j));
  }
}

// Grid (BH), chain_threads(C) threads: thread t owns candidates t + k * threads, k < 8.
__global__ void __launch_bounds__(kMaxChainThreads)
    chain_kernel(const uint32_t* keys, const int32_t* sizes, int C, int32_t* rank_out) {
  // Each warp's best of a step, double-buffered by step parity: a warp writes buffer s % 2 again at
  // step s + 2, after the barrier of step s + 1, which no warp passes before it has read buffer s % 2.
  __shared__ uint2 warp_best[2][kMaxChainThreads / 32];
  __shared__ int empties[kMaxChainThreads / 32];
  const int threads = static_cast<int>(blockDim.x), t = static_cast<int>(threadIdx.x);
  const int warp = t / 32, lane = t % 32, warps = threads / 32;
  const int64_t bh = blockIdx.x;
  const uint32_t* head_keys = keys + bh * C * C;
  const int32_t* size = sizes + bh * C;
  int32_t* rank = rank_out + bh * C;

  uint32_t alive = 0;  // bit k: candidate t + k * threads is non-empty and not yet in the chain
#pragma unroll
  for (int k = 0; k < kCandidatesPerThread; ++k) {
    const int c = t + k * threads;
    if (c < C && size[c] != 0) alive |= 1u << k;
  }

  int cur = 0, step = 0;
  for (;; ++step) {
    // The thread's best: every load is issued before the first comparison. Step 0 has no current
    // cluster: every live candidate gets the same key and the lowest index wins, the reference's first
    // non-empty cluster.
    const uint32_t* row = head_keys + int64_t{cur} * C;
    uint32_t key[kCandidatesPerThread];
#pragma unroll
    for (int k = 0; k < kCandidatesPerThread; ++k)
      key[k] = (alive >> k) & 1u ? (step == 0 ? 1u : row[t + k * threads]) : chain::kNoCandidate;
    uint32_t best_key = chain::kNoCandidate, best_index = ~0u;
#pragma unroll
    for (int k = 0; k < kCandidatesPerThread; ++k)
      if (key[k] > best_key) {  // strict: on equal keys the lower index (smaller k) stays
        best_key = key[k];
        best_index = static_cast<uint32_t>(t + k * threads);
      }
    // The warp's best (largest key, then lowest index), then the CTA's, reduced by every warp alike.
    uint32_t top = __reduce_max_sync(0xffffffffu, best_key);
    uint32_t index = __reduce_min_sync(0xffffffffu, best_key == top ? best_index : ~0u);
    if (lane == 0) warp_best[step % 2][warp] = make_uint2(top, index);
    __syncthreads();
    const uint2 w = lane < warps ? warp_best[step % 2][lane] : make_uint2(chain::kNoCandidate, ~0u);
    top = __reduce_max_sync(0xffffffffu, w.x);
    index = __reduce_min_sync(0xffffffffu, w.x == top ? w.y : ~0u);
    if (top == chain::kNoCandidate) break;  // every thread took the same winner: all leave together
    cur = static_cast<int>(index);
    if (cur % threads == t) {
      alive &= ~(1u << (cur / threads));
      rank[cur] = step;
    }
  }

  // Empty clusters take the last ranks in index order: `step` non-empty ones, then the empty ones
  // before c, counted chunk by chunk (clusters k * threads .. k * threads + threads - 1).
  int before = 0;
  for (int k = 0; k * threads < C; ++k) {
    const int c = t + k * threads;
    const bool empty = c < C && size[c] == 0;
    const unsigned lanes = __ballot_sync(0xffffffffu, empty);
    if (lane == 0) empties[warp] = __popc(lanes);
    __syncthreads();
    if (empty) {
      int r = before + __popc(lanes & ((1u << lane) - 1u));
      for (int v = 0; v < warp; ++v) r += empties[v];
      rank[c] = step + r;
    }
    before += __syncthreads_count(empty);  // also the barrier before `empties` is written again
  }
}

template <int kD>
void launch_similarities(const float* centroids, int64_t BH, int64_t C, int64_t D, const Scratch& s, cudaStream_t st) {
  const unsigned tiles = static_cast<unsigned>(ceil_div(C, kTile));
  inverse_norm_kernel<kD><<<dim3(tiles, static_cast<unsigned>(BH)), kTile, 0, st>>>(centroids, static_cast<int>(C),
                                                                                    static_cast<int>(D), s.inv_norms);
  SAPATTN_CUDA_CHECK_LAUNCH();
  similarity_kernel<kD><<<dim3(tiles, tiles, static_cast<unsigned>(BH)), kTile, 0, st>>>(
      centroids, s.inv_norms, static_cast<int>(C), static_cast<int>(D), s.keys);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace

int chain_threads(int64_t clusters) { return static_cast<int>(round_up(ceil_div(clusters, kCandidatesPerThread), 32)); }

Scratch carve(Carver& carver, int64_t batch_heads, int64_t clusters) {
  Scratch s;
  s.inv_norms = carver.take<float>(batch_heads * clusters);
  s.keys = carver.take<uint32_t>(batch_heads * clusters * clusters);
  return s;
}

void build_chain(const float* centroids, const int32_t* sizes, int64_t batch_heads, int64_t clusters, int64_t dim,
                 const Scratch& scratch, int32_t* rank, cudaStream_t stream) {
  SAPATTN_CHECK(fits(clusters, dim), UnsupportedError, "order_clusters' matrix kernels take 1 to ", kMaxClusters,
                " clusters of dimension 1 to 128, got ", clusters, " of ", dim);
  if (dim <= 64)
    launch_similarities<64>(centroids, batch_heads, clusters, dim, scratch, stream);
  else
    launch_similarities<128>(centroids, batch_heads, clusters, dim, scratch, stream);
  chain_kernel<<<static_cast<unsigned>(batch_heads), static_cast<unsigned>(chain_threads(clusters)), 0, stream>>>(
      scratch.keys, sizes, static_cast<int>(clusters), rank);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace sapattn::cuda::chain_matrix
