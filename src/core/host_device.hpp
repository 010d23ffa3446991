// SAPATTN_HOST_DEVICE marks arithmetic that both backends must compute bit for bit: plain C++ for
// the CPU; under nvcc the same function compiles for the device too.
#pragma once

#if defined(__CUDACC__)
#define SAPATTN_HOST_DEVICE __host__ __device__
#else
#define SAPATTN_HOST_DEVICE
#endif
