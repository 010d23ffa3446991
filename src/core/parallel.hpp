// Fork-join parallelism for host code (the CPU backend, the workload generator, evaluation). Work is split into fixed,
// index-ordered tasks so that every result is the same for any thread count (a task's arithmetic never depends on which
// thread runs it).
#pragma once

#include <cstdint>
#include <functional>

namespace sapattn {

// Threads a call uses: `requested` if > 0, else the hardware's (at least 1).
int resolve_threads(int requested);

// Runs fn(i) for i in [0, n) on up to `threads` threads (the caller's included). Tasks are handed
// out dynamically in index order. The first exception thrown by a task is rethrown on the caller
// after every thread has stopped.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn);

}  // namespace sapattn
