// The device primitives of the CUDA backend: every inline PTX the kernels issue (cp.async, ldmatrix,
// mma.sync, ex2, prefetch, the TMA tile and bulk loads) and the 16-byte-chunk XOR swizzle that the
// ldmatrix kernels share. One copy for the attention kernels, the tensor-core k-means assignment and any
// kernel to come, so that no kernel writes its own PTX; the Hopper kernel takes
// wgmma, mbarriers and named barriers from CuTe/CUTLASS instead.
//
// A wrapper is emitted only where a kernel calls it, so the sm_90-only ones (the TMA loads) cost the
// sm_80 objects nothing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace sapattn::cuda {

// ---------------------------------------------------------------------------------------------
// Shared memory
// ---------------------------------------------------------------------------------------------

// The 32-bit shared-state-space address of a pointer into shared memory (what PTX operands take).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte slot of (row, chunk) in a row-major tile of kChunks 16-byte chunks per row, XOR-swizzled:
// rows of 128 or 256 bytes would put the same chunk of the 8 rows that one ldmatrix phase reads in
// one bank group; XOR with row % 8 spreads them over 8.
template <int kChunks>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kChunks + (chunk ^ (row & 7));
}

// x, hidden from the optimizer: values derived from it inside a loop are recomputed there instead
// of being hoisted out of the loop into registers.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copies, completed by groups
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// Copies 16 bytes, or writes 16 zero bytes when `valid` is false (src-size 0: nothing is read, but
// src must still be a valid address).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups are in flight. The memory clobber keeps the compiler from
// moving shared-memory reads of the copied data above the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Starts pulling a global line towards L1 (no register result, nothing to wait for).
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p)); }
// Starts pulling a global line into L2: for data another warp of the SM reads later, which L1 (its
// capacity taken by shared memory) would not keep.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

// ---------------------------------------------------------------------------------------------
// ldmatrix and mma.sync (sm_80+)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  ldmatrix_x4(addr, r[0], r[1], r[2], r[3]);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a b for a 16x16 A fragment and a 16x8 B fragment (b0, b1) of T (__nv_bfloat16 or __half),
// fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to nearest into one register of T pairs (lo in the low half): an mma operand.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// ---------------------------------------------------------------------------------------------
// Barriers
// ---------------------------------------------------------------------------------------------

// __syncthreads() that warps may reach from different instructions: barrier 0 without .aligned
// (__syncthreads is barrier.sync.aligned, which requires every thread of the block at the same
// instruction; compute-sanitizer's synccheck reports the divergence). Each warp must still arrive
// converged, and every warp of the block must arrive.
__device__ __forceinline__ void block_barrier() { __barrier_sync(0); }

// ---------------------------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------------------------

// 2^x in one MUFU instruction; flushing results below 2^-126 to zero is far below what a softmax
// weight next to the row maximum (weight 1) can contribute. Not volatile: the compiler may move,
// merge or drop it like any arithmetic.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 2^x on the FMA pipe, for the softmaxes whose exponentials outrun the MUFU unit (an SM's MUFU
// gives 16 results a clock, the e4m3 tensor rate at head dim 128 needs 16 exponentials a clock): x
// = j + f with j = round(x) (the 1.5 x 2^23 shift) and f in [-1/2, 1/2], 2^f by a cubic (relative
// error 1.0e-4, coefficients fitted here for that interval with p(0) = 1), j added to the exponent
// bits. Eight instructions, no MUFU. x is clamped to -125 (2^-125, so that j + the cubic's exponent
// stays a normal number, -inf included); x must be below 127.5.
__device__ __forceinline__ float exp2_fma(float x) {
  constexpr float kShift = 12582912.0f;  // 1.5 x 2^23: adding it rounds to an integer in the low bits
  x = fmaxf(x, -125.0f);
  const float t = x + kShift;
  const float f = x - (t - kShift);
  float p = fmaf(0.05500893f, f, 0.24221097f);
  p = fmaf(p, f, 0.69328290f);
  p = fmaf(p, f, 1.0f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

// Two floats as e4m3 codes (OCP E4M3, round to nearest even, saturating: the codec of
// src/core/fp8.hpp), lo in the low byte (sm_89 and newer).
__device__ __forceinline__ uint16_t e4m3x2_of(float lo, float hi) {
  uint16_t d;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(d) : "f"(hi), "f"(lo));
  return d;
}

// Two e4m3 codes (lo in the low byte) as an f16 pair, exactly (every e4m3 value is an f16).
__device__ __forceinline__ __half2 half2_of_e4m3x2(uint16_t codes) {
  uint32_t d;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(d) : "h"(codes));
  return *reinterpret_cast<const __half2*>(&d);
}

// ---------------------------------------------------------------------------------------------
// TMA (sm_90)
// ---------------------------------------------------------------------------------------------

// One box of a 2-D tensor map at (c0, c1), as tma_load_4d.
__device__ __forceinline__ void tma_load_2d(const void* map, uint64_t* bar, void* smem, int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
}

// One box of a 5-D tensor map at (c0, ..., c4), as tma_load_4d.
__device__ __forceinline__ void tma_load_5d(const void* map, uint64_t* bar, void* smem, int32_t c0, int32_t c1,
                                            int32_t c2, int32_t c3, int32_t c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(smem_addr(bar))
      : "memory");
}

// One box of a 4-D tensor map (a CUtensorMap in param, const or global space) at coordinates
// (c0, c1, c2, c3) into shared memory at `smem`, its bytes counted on the mbarrier `bar`.
__device__ __forceinline__ void tma_load_4d(const void* map, uint64_t* bar, void* smem, int32_t c0, int32_t c1,
                                            int32_t c2, int32_t c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
}

// tma_load_4d into the same shared-memory offset of every CTA of the cluster named in `cta_mask`
// (bit r: CTA rank r), each copy counted on the mbarrier at `bar`'s offset in that CTA.
__device__ __forceinline__ void tma_load_4d_multicast(const void* map, uint64_t* bar, void* smem, uint16_t cta_mask,
                                                      int32_t c0, int32_t c1, int32_t c2, int32_t c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar)), "h"(cta_mask)
      : "memory");
}

// `count` arrivals on the mbarrier at `bar`'s offset in the shared memory of the cluster's CTA `cta`
// (this CTA's own rank included), with the default semantics (release at CTA scope), as CUTLASS's
// multicast pipelines free a stage: the reads it signals are the arriving warp's completed MMAs.
// (The first version released at cluster scope; the CTA pairs measured 1.4x slower than single CTAs
// with it, docs/attention.md.)
__device__ __forceinline__ void mbarrier_arrive_cluster(const uint64_t* bar, uint32_t cta, uint32_t count) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote], %2;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(cta), "r"(count)
      : "memory");
}

// One box of a 3-D tensor map at (c0, c1, c2), as tma_load_4d.
__device__ __forceinline__ void tma_load_3d(const void* map, uint64_t* bar, void* smem, int32_t c0, int32_t c1,
                                            int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
}

// `bytes` contiguous bytes (a multiple of 16; both addresses 16-byte aligned) from global memory into
// shared memory by the TMA unit, counted on the mbarrier `bar`.
__device__ __forceinline__ void bulk_load(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

}  // namespace sapattn::cuda
