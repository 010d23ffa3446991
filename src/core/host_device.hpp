// SAPATTN_HOST_DEVICE marks a function that both backends compile: plain C++ for the CPU, and
// __host__ __device__ under nvcc, so that a CUDA kernel and its CPU reference run the same code.
#pragma once

#if defined(__CUDACC__)
#define SAPATTN_HOST_DEVICE __host__ __device__
#else
#define SAPATTN_HOST_DEVICE
#endif
