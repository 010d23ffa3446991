// The CUDA FP8 pieces inside the backend (not ops): what the e4m3 attention (fp8_attention.cu)
// takes from the quantisation (fp8_quantize.cu). Host code only.
#pragma once

#include <cstdint>

#include "sapattn/layout.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::cuda {

// quantize_e4m3 per channel (no shift) with the codes written transposed in slots of 16 rows:
// codes_t[bh][r / 16][d][r % 16] (ld >= S rows per head, a multiple of 16; the last slot's rows past S
// zeros, slots past it untouched) is the code of x[b, h, perm[r], d]; scales [B*H, D] as
// quantize_e4m3's. The same codes and scales as quantize_e4m3, bit for bit. D <= 256. A slot is the
// e4m3 attention's V^T box: 16 keys x D channels, contiguous in memory as in shared memory.
void quantize_e4m3_channel_transposed(const TensorView& x, const TensorView& perm, uint8_t* codes_t, int64_t ld,
                                      float* scales, const Stream& stream);

// The e4m3 attention's operands in two fused passes (fp8_operands.cu), for the granularities that
// fused_operand_passes accepts (Fp8Options' defaults among them): Q per 128-row tile in cluster order,
// K per 128-row tile or one scale per head (`head_k`: a key tile covering the head), K minus the
// head's mean when `smooth`, V per channel with its codes transposed; the same codes and scales as
// quantize_e4m3, bit for bit. The buffers are carved by fp8_attention.cu; k_sum, k_extrema, k_head
// and v_inverse are scratch, k_scale_rows holds K's scales in rows of v_keys.
struct Fp8OperandBuffers {
  uint8_t *q_codes = nullptr, *k_codes = nullptr, *vt_codes = nullptr;
  float *q_scale = nullptr, *k_scale_rows = nullptr, *v_scale = nullptr, *v_inverse = nullptr;
  float *k_mean = nullptr, *lse_shift = nullptr;
  double* k_sum = nullptr;
  uint32_t* k_extrema = nullptr;  // [3, B*H, D]: K's column maxima and minima (ordered keys), non-finite flags
  float* k_head = nullptr;        // [B*H, 2]: the head's K scale and inverse (head_k)
  int64_t v_keys = 0;
};
bool fused_operand_passes(const Fp8Options& options, int64_t head_dim, int64_t keys);
void quantize_operands_fused(const TensorView& q, const TensorView& k, const TensorView& v, const RowPermutation& perm,
                             float scale, bool smooth, bool head_k, const Fp8OperandBuffers& out,
                             const Stream& stream);

// block_sparse_attention_e4m3 in its two steps (fp8_attention.cu), so that the kernel can be timed
// apart from the quantisation passes (bench/bench_attention.cu): the operands quantised in cluster
// order into the workspace, then the plan and the kernel over them.
struct E4m3Operands {
  DType dtype = DType::BF16;
  int64_t B = 0, H = 0, Sq = 0, Sk = 0, v_keys = 0;
  float scale = 0.0f, p_scale = 448.0f;
  bool p_sum_e4m3 = true;
  bool one_key_scale = false;  // one K scale per head: the key tile covers the head's keys
  Workspace plan;
  TensorView q_perm;  // where the output rows go (empty: cluster order)
  const uint8_t *q_codes = nullptr, *k_codes = nullptr, *vt_codes = nullptr;
  const float *q_scale = nullptr, *k_scale = nullptr, *v_scale = nullptr, *lse_shift = nullptr;
};
E4m3Operands quantize_e4m3_operands(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const BlockLayout& layout, float scale, const Fp8Options& options,
                                    const Stream& stream, Workspace workspace, const RowPermutation& perm);
void attend_e4m3(const E4m3Operands& operands, const BlockLayout& layout, TensorView out, TensorView lse,
                 const Stream& stream);

}  // namespace sapattn::cuda
