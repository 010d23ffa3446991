// Typed errors. Library code reports every bad input by throwing one of these; it never exits.
// Each error carries the source location that raised it and a message a user can act on.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace sapattn {

class Error : public std::runtime_error {
 public:
  Error(const std::string& message, const char* file, int line)
      : std::runtime_error(message), file_(file), line_(line) {}
  const char* file() const noexcept { return file_; }
  int line() const noexcept { return line_; }

 private:
  const char* file_;
  int line_;
};

// An option or argument outside its valid range (config values, cluster counts, iteration counts).
class InvalidArgumentError : public Error {
  using Error::Error;
};
// Tensor shapes, strides or sizes that do not fit the op's contract.
class ShapeError : public Error {
  using Error::Error;
};
// A dtype the op does not accept.
class DTypeError : public Error {
  using Error::Error;
};
// NaN or Inf in an input that must be finite.
class NonFiniteError : public Error {
  using Error::Error;
};
// A malformed, truncated or inconsistent file (npy, safetensors).
class FormatError : public Error {
  using Error::Error;
};
// A file that cannot be opened, read or written.
class IoError : public Error {
  using Error::Error;
};
// A device or feature this build does not provide (e.g. CUDA tensors in a CPU-only build).
class UnsupportedError : public Error {
  using Error::Error;
};
// A caller-provided workspace smaller than the op asked for.
class WorkspaceError : public Error {
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace sapattn

// Throws ErrorType with a message built from the remaining arguments when cond is false.
#define SAPATTN_CHECK(cond, ErrorType, ...)                                                   \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      throw ::sapattn::ErrorType(::sapattn::detail::concat(__VA_ARGS__), __FILE__, __LINE__); \
    }                                                                                         \
  } while (0)

#define SAPATTN_THROW(ErrorType, ...) \
  throw ::sapattn::ErrorType(::sapattn::detail::concat(__VA_ARGS__), __FILE__, __LINE__)
