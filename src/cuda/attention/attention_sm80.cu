// The mma.sync attention kernel for any sm_80+ GPU (A100, consumer Ampere/Ada, and the H100 when the
// wgmma kernel is not built or is overridden): FlashAttention-2's forward design over the work plan
// of attention.hpp.
//
// A CTA of 4 warps computes one work item: kTileQ = 128 query rows, 32 per warp as two m16 tiles, so
// every K and V fragment a warp reads from shared memory feeds two mma (with one m16 tile per warp,
// shared-memory bandwidth rather than the tensor cores would set the pace). Keys come in tiles of 64
// (head dim 128) or 128 (head dim 64), FlashAttention-2's choices for the A100: the S tile and the O
// accumulator take 192 registers per thread either way, and two CTAs (8 warps) share an SM.
//
// Shared memory holds Q, one K tile and one V tile, each row-major and XOR-swizzled so that the
// eight 16-byte rows of every ldmatrix phase fall in distinct banks. Each cp.async load overlaps the
// other half of the work, as in FlashAttention-2: V of tile n arrives while S = Q K^T runs, K of tile
// n + 1 while the softmax and O += P V of tile n run. That takes two barriers per tile and keeps a
// CTA at 68 KB (head dim 128), two per SM on an A100, where double-buffered K and V would need 100.
//
// Keys: the item's segments form a virtual key sequence of length L, packed into tiles that cross
// segment boundaries. Thread t < kTileK owns column t of every tile: a cursor that only moves
// forward turns its virtual position into a key row (segment delta), then k_perm into the K and V
// row addresses, stored in a two-slot table that the loads read. Tile n + 2's addresses are made
// during tile n, the k_perm entry prefetched before the softmax and read after P V.
//
// Softmax: fp32 scores, online, with exp2 in the log2 domain (scale * log2 e folded into one FMA per
// score); masked keys are -inf before the row max. P is rounded to the input type in registers and
// reused as the A operand of P V; the row sums add the fp32 weights, so the LSE is as exact as fp32
// allows and O differs from the exact weighted mean by the rounding of P only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention/attention.hpp"
#include "cuda/attention/flash_tile.cuh"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda::attn {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = kTileQ / kWarps;  // 32 query rows per warp
constexpr int kMTiles = kWarpRows / 16;     // m16 tiles per warp
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

// What the key walk needs about the item, once per tile. It lives in shared memory: the hot loop
// has no registers to spare for it.
template <typename T>
struct ItemState {
  const T* k;  // this head's K and V
  const T* v;
  const int32_t* k_perm;  // this head's row of k_perm, or null
  const Segment* segments;
  int count;   // segments in the list
  int length;  // L: the last segment's cum_end
  int bh;
};

// A walker thread's position in the segment list (it is asked for ascending positions only), and
// the key row it is resolving.
struct Cursor {
  int at;     // the segment holding the last position asked for
  int end;    // its cum_end
  int delta;  // its delta
  int row;    // cluster-ordered key row of the pending column, -1 for none
};

// Row `row` of a sequence of S rows read through perm (identity when null), or -1 for a permutation
// entry outside [0, S), which is reported through the value-check flag.
__device__ __forceinline__ int permuted_row(const int32_t* perm, int row, int S, int* flag) {
  const int src = perm != nullptr ? __ldg(perm + row) : row;
  if (src >= 0 && src < S) return src;
  if (flag != nullptr) atomicOr(flag, kBadPermIndex);
  return -1;
}

// First half of resolving virtual position pos: advances the cursor to its segment and starts
// pulling the k_perm entry towards L1, so that finish_key, a tile's worth of mma later, finds it.
// A row outside [0, seq_k) can only come from a malformed plan; it is reported as bad offsets.
template <typename T>
__device__ __forceinline__ void start_key(const ItemState<T>& item, Cursor& cursor, int pos, int seq_k, int* flag) {
  Cursor c = cursor;
  c.row = -1;
  if (pos < item.length) {
    while (pos >= c.end && c.at + 1 < item.count) {
      // The segment list's address came through shared memory: __ldg says it is global and read-only.
      const Segment* s = item.segments + ++c.at;
      c.end = __ldg(&s->cum_end);
      c.delta = __ldg(&s->delta);
    }
    const int r = pos + c.delta;
    if (r >= 0 && r < seq_k) {
      c.row = r;
      if (item.k_perm != nullptr) prefetch_l1(item.k_perm + r);
    } else if (flag != nullptr) {
      atomicOr(flag, kBadOffsets);
    }
  }
  cursor = c;
}

// Second half: the K and V addresses of the pending row, null for a zero row.
template <typename T>
__device__ __forceinline__ void finish_key(const ItemState<T>& item, const Cursor& cursor, const Params& p,
                                           const T** k_src, const T** v_src) {
  const int r = cursor.row < 0 ? -1 : permuted_row(item.k_perm, cursor.row, p.seq_k, p.flag);
  *k_src = r < 0 ? nullptr : item.k + r * p.k_stride[2];
  *v_src = r < 0 ? nullptr : item.v + r * p.v_stride[2];
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------

// Tile sizes and the shared-memory layout (bytes) of a CTA.
template <typename T, int D>
struct Config {
  static constexpr int kTileK = D == 64 ? 128 : 64;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kTileQ * D * 2;
  static constexpr int kOffV = kOffK + kTileK * D * 2;
  static constexpr int kOffKSrc = kOffV + kTileK * D * 2;                  // const T*[2][kTileK]: K row addresses
  static constexpr int kOffVSrc = kOffKSrc + 2 * kTileK * sizeof(T*);      // const T*[2][kTileK]: V row addresses
  static constexpr int kOffCursors = kOffVSrc + 2 * kTileK * sizeof(T*);   // Cursor[kTileK]
  static constexpr int kOffQRows = kOffCursors + kTileK * sizeof(Cursor);  // int[kTileQ]: source of each Q row
  static constexpr int kOffItem = kOffQRows + kTileQ * 4;                  // ItemState<T>
  static constexpr int kBytes = kOffItem + sizeof(ItemState<T>);
  static_assert(kOffItem % alignof(ItemState<T>) == 0 && kOffCursors % alignof(Cursor) == 0);
  // Thread t resolves query row t and key column t; tiles are copied by whole chunk columns.
  static_assert(kThreads == kTileQ && kTileK <= kThreads && kThreads % kChunks == 0 && 32 % kChunks == 0);
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) attention_kernel(const Params p) {
  using C = Config<T, D>;
  constexpr int kTileK = C::kTileK;
  constexpr int kChunks = C::kChunks;
  constexpr int kNTiles = kTileK / 8;  // n8 tiles of S per m16 tile
  constexpr int kDTiles = D / 8;       // n8 tiles of O per m16 tile
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t q_tile = smem_addr(smem + C::kOffQ);
  const uint32_t k_tile = smem_addr(smem + C::kOffK);
  const uint32_t v_tile = smem_addr(smem + C::kOffV);
  const T** k_src = reinterpret_cast<const T**>(smem + C::kOffKSrc);
  const T** v_src = reinterpret_cast<const T**>(smem + C::kOffVSrc);
  Cursor* cursors = reinterpret_cast<Cursor*>(smem + C::kOffCursors);
  int* q_rows = reinterpret_cast<int*>(smem + C::kOffQRows);
  ItemState<T>& item = *reinterpret_cast<ItemState<T>*>(smem + C::kOffItem);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // ---- the work item: query rows [q_begin, q_end) of head bh, and its key segments ----------------
  int bh, q_begin, q_end, count, length;
  const Segment* segments = nullptr;
  Segment first{0, 0};
  if (p.dense) {
    const int tiles = (p.seq_q + kTileQ - 1) / kTileQ;
    bh = static_cast<int>(blockIdx.x) / tiles;
    q_begin = static_cast<int>(blockIdx.x) % tiles * kTileQ;
    q_end = min(p.seq_q, q_begin + kTileQ);
    count = 1;
    length = p.seq_k;
    first = Segment{0, p.seq_k};
  } else {
    if (static_cast<int>(blockIdx.x) >= *p.plan.num_items) return;
    const WorkItem w = p.plan.items[blockIdx.x];
    bh = w.bh;
    q_begin = w.q_begin;
    q_end = w.q_end;
    const int64_t r = static_cast<int64_t>(bh) * p.plan.q_clusters + w.q_cluster;
    segments = p.plan.segments + r * p.plan.k_clusters;
    count = p.plan.num_segments[r];
    if (count > 0) first = segments[0];
    length = count > 0 ? segments[count - 1].cum_end : 0;
  }
  const int num_tiles = (length + kTileK - 1) / kTileK;
  {
    const int64_t b = bh / p.heads, h = bh % p.heads;
    if (tid == 0)
      item = ItemState<T>{static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1],
                          static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1],
                          p.k_perm != nullptr ? p.k_perm + static_cast<int64_t>(bh) * p.seq_k : nullptr,
                          segments,
                          count,
                          length,
                          bh};
    const int row = q_begin + tid;
    q_rows[tid] = row < q_end
                      ? permuted_row(p.q_perm != nullptr ? p.q_perm + static_cast<int64_t>(bh) * p.seq_q : nullptr, row,
                                     p.seq_q, p.flag)
                      : -1;
  }
  // Thread t < kTileK walks column t of every key tile.
  const bool walker = tid < kTileK;
  if (walker) cursors[tid] = Cursor{0, first.cum_end, first.delta, -1};
  __syncthreads();
  // The sources of key tiles 0 and 1 (slot = tile % 2); tile n + 2's are made during tile n.
  if (walker)
    for (int tile = 0; tile < 2; ++tile) {
      start_key(item, cursors[tid], tile * kTileK + tid, p.seq_k, p.flag);
      finish_key(item, cursors[tid], p, &k_src[tile * kTileK + tid], &v_src[tile * kTileK + tid]);
    }
  __syncthreads();

  // Tiles are copied as rows of 16-byte chunks; kThreads is a multiple of kChunks, so each thread
  // copies one chunk column of every (kThreads / kChunks)-th row. Rows without a source (past the
  // item's rows or keys, or with a bad permutation entry) become zeros, so masked scores stay finite
  // and 0 * V is never NaN; their copies read nothing but still name a valid address.
  const int load_row = tid / kChunks, load_chunk = tid % kChunks;
  // A key tile from its row addresses (null: zero row).
  auto load_keys = [&](uint32_t dst, const T* const* sources, const void* any_valid) {
#pragma unroll
    for (int u = 0; u < kTileK * kChunks / kThreads; ++u) {
      const int row = load_row + u * (kThreads / kChunks);
      const T* src = sources[row];
      cp_async16_zfill(dst + swizzle<kChunks>(row, load_chunk) * 16,
                       src != nullptr ? static_cast<const void*>(src + load_chunk * 8) : any_valid, src != nullptr);
    }
  };

  if (num_tiles > 0) {
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
#pragma unroll
    for (int u = 0; u < kTileQ * kChunks / kThreads; ++u) {
      const int row = load_row + u * (kThreads / kChunks);
      const int s = q_rows[row];
      cp_async16_zfill(q_tile + swizzle<kChunks>(row, load_chunk) * 16,
                       s >= 0 ? static_cast<const void*>(q + s * p.q_stride[2] + load_chunk * 8) : p.q, s >= 0);
    }
    load_keys(k_tile, k_src, p.k);
    cp_async_commit();
  }

  // o[mt][j] covers rows (warp * 32 + mt * 16 + g, + 8) x dims (j * 8 + 2 * t4, + 1), as the mma C
  // fragment; row_max and row_sum follow the same two rows per m tile (index 2 * mt + half): the
  // maximum in the log2 domain (scores times scale * log2 e), and the sum of this lane's columns'
  // fp32 weights.
  const int g = lane / 4, t4 = lane % 4;
  const flash::LaneOffsets lanes = flash::lane_offsets<D>(lane, warp * kWarpRows);
  float o[kMTiles][kDTiles][4];
  float row_max[2 * kMTiles], row_sum[2 * kMTiles];
  flash::start_rows(o, row_max, row_sum);
  const float scale_log2 = p.scale * kLog2e;  // the op requires scale > 0: -inf scores stay -inf

  for (int n = 0; n < num_tiles; ++n) {
    cp_async_wait<0>();
    __syncthreads();  // K[n] (and Q) landed; every warp is done with V[n - 1]
    load_keys(v_tile, v_src + (n % 2) * kTileK, p.v);
    cp_async_commit();

    // ---- S = Q K^T --------------------------------------------------------------------------------
    // Recomputing the ~80 distinct ldmatrix addresses in each iteration is cheaper than holding them.
    const uint32_t q_at = opaque(lanes.q), k_at = opaque(lanes.k), v_at = opaque(lanes.v);
    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
    flash::qk_tile<T, kMTiles, kNTiles, D>(s, q_tile, q_at, k_tile, k_at);

    cp_async_wait<0>();
    __syncthreads();  // V[n] landed; every warp is done with K[n]
    if (n + 1 < num_tiles) {
      load_keys(k_tile, k_src + (n + 1) % 2 * kTileK, p.k);
      cp_async_commit();
    }
    // Tile n + 2's sources go to the slot of tile n, whose K and V are issued. They are finished
    // after P V, so the k_perm gather has the softmax and the mma to arrive.
    if (walker) start_key(item, cursors[tid], (n + 2) * kTileK + tid, p.seq_k, p.flag);

    // ---- online softmax ---------------------------------------------------------------------------
    const int valid = item.length - n * kTileK;  // keys of this tile inside the sequence
    if (valid < kTileK) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (j * 8 + 2 * t4 + e % 2 >= valid) s[mt][j][e] = -INFINITY;
    }
    float base[2 * kMTiles];     // the log2-domain exponent each row's weights are taken relative to
    float rescale[2 * kMTiles];  // what the row's earlier weights are multiplied by
    flash::softmax_step(s, scale_log2, row_max, row_sum, base, rescale);
    flash::rescale_o(o, rescale);

    // ---- O += P V, 16 keys at a time ----------------------------------------------------------------
    flash::pv_tile<T, kMTiles, kNTiles, kDTiles>(o, s, scale_log2, base, row_sum, v_tile, v_at);
    if (walker) finish_key(item, cursors[tid], p, &k_src[n % 2 * kTileK + tid], &v_src[n % 2 * kTileK + tid]);
  }

  // ---- epilogue: O / l through this warp's own Q rows (no other warp reads them), then 16-byte rows --
  const int64_t b = item.bh / p.heads, h = item.bh % p.heads;
  T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1];
  unsigned char* stage = smem + C::kOffQ;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * mt + half;
      // The four lanes of a quad hold the row's other columns.
      float sum = row_sum[i];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = sum != 0.0f ? 1.0f / sum : 0.0f;
      const int row = warp * kWarpRows + mt * 16 + half * 8 + g;
#pragma unroll
      for (int j = 0; j < kDTiles; ++j)
        *reinterpret_cast<uint32_t*>(stage + swizzle<kChunks>(row, j) * 16 + t4 * 4) =
            pack2<T>(o[mt][j][2 * half] * inv, o[mt][j][2 * half + 1] * inv);
      const int dst = q_rows[row];
      if (p.lse != nullptr && t4 == 0 && dst >= 0)
        p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + dst * p.lse_stride[2]] =
            sum != 0.0f ? (row_max[i] + log2f(sum)) * kLn2 : -INFINITY;
    }
  __syncwarp();
#pragma unroll
  for (int u = 0; u < kWarpRows * kChunks / 32; ++u) {
    const int row = warp * kWarpRows + lane / kChunks + u * (32 / kChunks), ch = lane % kChunks;
    const int dst = q_rows[row];
    if (dst >= 0)
      *reinterpret_cast<uint4*>(out + dst * p.o_stride[2] + ch * 8) =
          *reinterpret_cast<const uint4*>(stage + swizzle<kChunks>(row, ch) * 16);
  }
}

template <typename T, int D>
void launch(const Params& p, cudaStream_t stream) {
  const int64_t grid = p.dense ? int64_t{p.batch} * p.heads * ceil_div(p.seq_q, kTileQ) : p.plan.max_items;
  if (grid == 0) return;
  SAPATTN_CHECK(grid < (int64_t{1} << 31), UnsupportedError,
                "attention on CUDA takes fewer than 2^31 query tiles, got ", grid);
  const auto kernel = attention_kernel<T, D>;
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), Config<T, D>::kBytes);
  kernel<<<static_cast<unsigned>(grid), kThreads, Config<T, D>::kBytes, stream>>>(p);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace

void run_sm80(const Params& params, bool is_bf16, cudaStream_t stream) {
  SAPATTN_CHECK(!params.pair && (params.dense || params.plan.item_rows == kTileQ), InvalidArgumentError,
                "the sm80 attention kernel runs items of ", kTileQ, " rows, without CTA pairs");
  const bool found = KernelHeadDims::dispatch<__nv_bfloat16, __half>(is_bf16, params.head_dim, [&](auto instance) {
    using I = decltype(instance);
    launch<typename I::T, I::kHeadDim>(params, stream);
  });
  SAPATTN_CHECK(found, UnsupportedError, "the sm80 attention kernel takes head dim 64 or 128, got ", params.head_dim);
}

}  // namespace sapattn::cuda::attn
