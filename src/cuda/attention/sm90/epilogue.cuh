// The Hopper attention kernel's epilogue: a consumer warpgroup's O accumulators and row statistics
// (mainloop.cuh) become output rows. Normalise, then write the rows of the item in place (or through
// q_perm). Under p.accumulate (key phases) out and lse already hold an earlier phase's result for
// these rows and the two merge by their LSEs; the four lanes of a quad share a row, so all of them
// read its old lse before any writes the new one.
//
// The e4m3 kernel (Tr::kFp8) adds a term per row to the LSE (K smoothing's) and multiplies channel d
// of the output by its V scale over p_scale (col_scale, in shared memory: Fp8Traits::Smem::v_scale).
#pragma once

#include <cute/tensor.hpp>

#include "cuda/attention/sm90/scheduler.cuh"
#include "cuda/attention/sm90/traits.cuh"

namespace sapattn::cuda::attn::sm90 {

template <class Tr, typename Out = typename Tr::T>
struct Epilogue {
  using T = Out;
  const Params& p;
  const float* col_scale = nullptr;  // e4m3: [kHeadDim], sv_d (shared memory)
  float col_unit = 1.0f;             // e4m3: 1 / p_scale

  __device__ __forceinline__ explicit Epilogue(const Params& params) : p(params) {}
  __device__ __forceinline__ Epilogue(const Params& params, const float* v_scale, float inv_p_scale)
      : p(params), col_scale(v_scale), col_unit(inv_p_scale) {}

  // The rows of `it` that consumer warpgroup `wg` computed (rows [64 wg, 64 wg + 64)), from this
  // thread's fragment (the thread is `lane` of `warp` in the warpgroup): O / row sum, LSE = max *
  // scale + log(sum). row_sum is the thread's share of its quad's, or with Tr::kSumByMma the whole
  // (the MMA's ones columns: every thread of the quad holds it). Columns of tOrO past kHeadDim are
  // not output.
  template <class FragO>
  __device__ __forceinline__ void store(const Item& it, int wg, int warp, int lane, const FragO& tOrO,
                                        const float (&row_max)[2], const float (&row_sum)[2],
                                        const float (&lse_shift)[2] = {0.0f, 0.0f}) const {
    const int b = it.bh / p.heads, h = it.bh % p.heads;
    T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1];
    float* lse = p.lse == nullptr ? nullptr : p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
    int32_t rows[2];
    float old_lse[2] = {-INFINITY, -INFINITY};
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int local = 64 * wg + 16 * warp + lane / 4 + 8 * r;
      rows[r] =
          local < it.rows ? through_perm(p.q_perm, int64_t{it.bh} * p.seq_q, it.q_begin + local, p.seq_q, p.flag) : -1;
      if (p.accumulate && rows[r] >= 0) old_lse[r] = lse[static_cast<int64_t>(rows[r]) * p.lse_stride[2]];
    }
    __syncwarp();
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[r];
      if constexpr (!Tr::kSumByMma) {
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
      }
      const int32_t row = rows[r];
      if (row < 0) continue;
      float inv = sum != 0.0f ? 1.0f / sum : 0.0f;
      float new_lse = sum != 0.0f ? row_max[r] * p.scale + logf(sum) : -INFINITY;
      if constexpr (Tr::kFp8) new_lse += lse_shift[r];
      T* dst = out + static_cast<int64_t>(row) * p.o_stride[2] + 2 * (lane % 4);
      float keep = 0.0f;  // the old row's weight in the merged one
      if (p.accumulate) {
        if (new_lse == -INFINITY) continue;  // no key of this phase: the row keeps its earlier result
        const float m = fmaxf(old_lse[r], new_lse);
        const float w_old = __expf(old_lse[r] - m), w_new = __expf(new_lse - m), total = w_old + w_new;
        keep = w_old / total;
        inv *= w_new / total;
        new_lse = m + logf(total);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < Tr::kHeadDim / 8; ++g) {
        float x0 = tOrO(4 * g + 2 * r) * inv, x1 = tOrO(4 * g + 2 * r + 1) * inv;
        if constexpr (Tr::kFp8) {
          const float2 sv = *reinterpret_cast<const float2*>(col_scale + 8 * g + 2 * (lane % 4));
          x0 *= sv.x * col_unit;
          x1 *= sv.y * col_unit;
        }
        if (p.accumulate) {
          const uint32_t bits = *reinterpret_cast<const uint32_t*>(dst + 8 * g);
          const T* old = reinterpret_cast<const T*>(&bits);
          x0 += keep * static_cast<float>(old[0]);
          x1 += keep * static_cast<float>(old[1]);
        }
        T pair[2] = {static_cast<T>(x0), static_cast<T>(x1)};
        *reinterpret_cast<uint32_t*>(dst + 8 * g) = *reinterpret_cast<const uint32_t*>(pair);
      }
      if (lse != nullptr && lane % 4 == 0) lse[static_cast<int64_t>(row) * p.lse_stride[2]] = new_lse;
    }
  }
};

}  // namespace sapattn::cuda::attn::sm90
