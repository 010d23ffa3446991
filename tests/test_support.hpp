// GoogleTest helpers shared by the op suites: per-test seeds and checks that a failing call leaves
// its outputs untouched.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "reference.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::testing_support {

// A seed derived from the running test's full name, so every case draws its own inputs.
inline uint64_t case_seed(uint64_t index = 0) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return ref::test_seed(std::string(info->test_suite_name()) + "." + info->name(), index);
}

// Two threads: the CPU backend's task split is exercised on every call.
inline const Stream kStream = Stream::cpu(2);

// Runs f, expects exception E, and checks that the outputs' bytes did not change.
template <typename E, typename F>
void expect_error_untouched(F&& f, std::vector<const ref::HostTensor*> outputs) {
  std::vector<std::vector<uint8_t>> before;
  for (const ref::HostTensor* t : outputs) before.push_back(t->bytes());
  EXPECT_THROW(f(), E);
  for (size_t i = 0; i < outputs.size(); ++i) EXPECT_EQ(outputs[i]->bytes(), before[i]) << "output " << i << " written";
}

template <typename E, typename F>
void expect_error_untouched(F&& f, const ref::HostTensor& output) {
  expect_error_untouched<E>(std::forward<F>(f), std::vector<const ref::HostTensor*>{&output});
}

}  // namespace sapattn::testing_support

// The failing call's text is in the trace.
#define EXPECT_ERROR_UNTOUCHED(E, outputs, ...)                                           \
  do {                                                                                    \
    SCOPED_TRACE(#__VA_ARGS__);                                                           \
    ::sapattn::testing_support::expect_error_untouched<E>([&] { __VA_ARGS__; }, outputs); \
  } while (0)
