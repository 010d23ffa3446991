// What the k-means suites share (test_cuda_kmeans.cpp: every op, the mma.sync assignment;
// test_cuda_kmeans_sm90.cpp: the wgmma assignment): the case table, the CPU's starts and labels, the
// error model of the tensor-core assignment (the tie bound E of docs/cuda.md), the label comparison
// and the check of a whole kmeans call against the CPU's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda_support.hpp"

namespace sapattn::cuda_test {

struct KmCase {
  int64_t B, H, N, D, C;
  DType dtype;
  ref::Layout layout;
  int64_t modes;  // 0: noise
};

std::string describe(const KmCase& k);

// The table both tensor-core kernels run: B > 1, strided and padded layouts, C > N, C = 1, noise with
// many near ties, every dtype, and head dims without tensor cores (32, 96: the exact kernel).
std::vector<KmCase> kmeans_cases();

HostTensor points_of(const KmCase& k, ref::Rng& rng);
// The centroids [B,H,C,D] that the CPU's kmeans_init samples from x with the next seed of rng.
HostTensor initial_centroids(const KmCase& k, const HostTensor& x, ref::Rng& rng);
// x's labels [B,H,N] by the CPU's exact assignment to the centroids c.
HostTensor cpu_labels(const KmCase& k, const HostTensor& x, const HostTensor& c);

// The assignment kernel for a scope (cuda::set_assign_kernel); the default ("auto") comes back at its end.
class AssignKernelScope {
 public:
  explicit AssignKernelScope(const char* name);
  ~AssignKernelScope();
  AssignKernelScope(const AssignKernelScope&) = delete;
  AssignKernelScope& operator=(const AssignKernelScope&) = delete;
};

// The bound E of docs/cuda.md on |approximate - exact| of one squared distance of the tensor-core
// assignment, key truncation included (double here, so no rounding of its own), per point. The
// centroids are padded to a multiple of c_pad_multiple (the kernel's tile: the key's column bits).
std::vector<double> tie_bound(const TensorView& points, const TensorView& centroids, int64_t c_pad_multiple);

struct Agreement {
  int64_t total = 0, differ = 0, beyond_tie = 0;
  double worst_excess = 0;  // max over disagreements of (d(gpu) - d(cpu)) / 2E
  // Rows where no third centroid comes within 2E of the CPU's: the re-ranking settles them the CPU's
  // way, so their labels must be the CPU's.
  int64_t settled = 0, settled_differ = 0;
  std::vector<uint8_t> is_settled;  // per row
};

// Compares GPU labels with CPU labels of the same centroids: a disagreement is allowed only where the
// GPU's label is within 2E of the CPU's in exact distance, and only on rows that are not settled.
Agreement compare_labels(const TensorView& points, const TensorView& centroids, const std::vector<double>& gpu,
                         const std::vector<double>& cpu, int64_t c_pad_multiple);
// Expects what compare_labels allows: nothing beyond a tie, every settled row the CPU's, >= 99.9% identical.
void expect_agreement(const Agreement& a, const std::string& what);

// The tensor-core assignment of x to c (device copies) with a workspace, the result on the host.
HostTensor gpu_assign(const KmCase& k, const DeviceTensor& x, const DeviceTensor& c, const HostTensor& like,
                      unsigned long long* refined = nullptr);

// kmeans from the CPU's initial centroids, `iters` iterations on both backends: labels, objective, and
// the internal consistency of the GPU's result (sizes count its labels; non-empty centroids are the
// means of its labels).
void check_kmeans(const KmCase& k, int iters);

}  // namespace sapattn::cuda_test
