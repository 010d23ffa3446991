// NumPy .npy files. The layout (numpy/lib/format.py, "NEP 1"):
//   "\x93NUMPY", major, minor, header length (u16 LE for 1.0, u32 LE for 2.0 and 3.0),
//   the header: a Python dict literal {'descr': ..., 'fortran_order': ..., 'shape': (...), }
//   padded with spaces and a '\n' so that the data starts at a multiple of 64 bytes, then the data.
// The reader accepts the subset of Python literal syntax NumPy and other writers emit: single- or
// double-quoted strings without escapes, True/False, tuples of decimal integers.
#include <algorithm>
#include <bit>
#include <cctype>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>

#include "io/json.hpp"
#include "io/tensor_bytes.hpp"
#include "sapattn/error.hpp"
#include "sapattn/io.hpp"

namespace sapattn::io {
namespace {

static_assert(std::endian::native == std::endian::little,
              "npy data is copied as is, which assumes a little-endian host");

constexpr std::string_view kMagic{"\x93NUMPY", 6};
constexpr size_t kAlign = 64;  // NumPy aligns the data for memory mapping

struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

// Parses the header dict. `where` starts every message ("npy file 'x.npy'").
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& where) : text_(text), where_(where) {}

  NpyHeader parse() {
    NpyHeader h;
    bool seen_descr = false, seen_fortran = false, seen_shape = false;
    skip_whitespace();
    expect('{', "expected a Python dict literal starting with '{'");
    while (true) {
      skip_whitespace();
      if (peek_is('}')) break;
      const std::string key = parse_string("a quoted key");
      skip_whitespace();
      expect(':', "expected ':' after the key");
      skip_whitespace();
      const auto mark_seen = [&](bool& seen) {
        if (seen) fail("key '", key, "' appears twice");
        seen = true;
      };
      if (key == "descr") {
        mark_seen(seen_descr);
        if (!peek_is('\'') && !peek_is('"')) {
          fail("descr must be a string such as '<f4' (structured dtypes are not supported)");
        }
        h.descr = parse_string("a descr string");
      } else if (key == "fortran_order") {
        mark_seen(seen_fortran);
        h.fortran_order = parse_bool();
      } else if (key == "shape") {
        mark_seen(seen_shape);
        h.shape = parse_shape();
      } else {
        fail("unexpected key '", detail::printable(key),
             "' (the header holds exactly 'descr', 'fortran_order' and 'shape')");
      }
      skip_whitespace();
      if (peek_is(',')) {
        ++pos_;
        continue;
      }
      if (!peek_is('}')) fail("expected ',' or '}' after the value of '", key, "'");
    }
    ++pos_;
    skip_whitespace();
    if (pos_ != text_.size()) {
      fail("unexpected ", describe_next(), " after the header dict (is the header length right?)");
    }
    if (!seen_descr || !seen_fortran || !seen_shape) {
      fail("the header lacks ",
           !seen_descr     ? "'descr'"
           : !seen_fortran ? "'fortran_order'"
                           : "'shape'",
           " (it needs 'descr', 'fortran_order' and 'shape')");
    }
    return h;
  }

 private:
  template <typename... Args>
  [[noreturn]] void fail(const Args&... args) const {
    SAPATTN_THROW(FormatError, where_, ": header: ", args..., " (at header byte ", pos_, ")");
  }

  bool at_end() const { return pos_ >= text_.size(); }
  bool peek_is(char c) const { return !at_end() && text_[pos_] == c; }

  std::string describe_next() const {
    return at_end() ? std::string("end of header")
                    : ::sapattn::detail::concat("'", detail::printable(text_.substr(pos_, 1)), "'");
  }

  void skip_whitespace() {
    while (!at_end() && std::string_view(" \t\n\r\f\v").find(text_[pos_]) != std::string_view::npos) ++pos_;
  }

  void expect(char c, std::string_view message) {
    if (!peek_is(c)) fail(message, ", found ", describe_next());
    ++pos_;
  }

  std::string parse_string(std::string_view what) {
    if (!peek_is('\'') && !peek_is('"')) fail("expected ", what, ", found ", describe_next());
    const char quote = text_[pos_++];
    const size_t begin = pos_;
    while (!at_end() && text_[pos_] != quote) {
      if (text_[pos_] == '\\') fail("escapes in header strings are not supported");
      if (text_[pos_] == '\n') fail("unterminated string");
      ++pos_;
    }
    if (at_end()) fail("unterminated string");
    return std::string(text_.substr(begin, pos_++ - begin));
  }

  // A run of identifier or number characters, for True/False and shape extents.
  std::string_view parse_word() {
    const size_t begin = pos_;
    while (!at_end() && (std::isalnum(static_cast<unsigned char>(text_[pos_])) ||
                         std::string_view("+-._").find(text_[pos_]) != std::string_view::npos)) {
      ++pos_;
    }
    return text_.substr(begin, pos_ - begin);
  }

  bool parse_bool() {
    const size_t begin = pos_;
    const std::string_view word = parse_word();
    if (word == "True") return true;
    if (word == "False") return false;
    pos_ = begin;
    fail("fortran_order must be True or False, found ",
         word.empty() ? describe_next() : ::sapattn::detail::concat("'", detail::printable(word), "'"));
  }

  int64_t parse_extent() {
    const size_t begin = pos_;
    const std::string_view word = parse_word();
    const bool digits_only =
        !word.empty() && std::all_of(word.begin(), word.end(), [](char c) { return c >= '0' && c <= '9'; });
    pos_ = begin;  // report errors at the start of the extent
    if (!digits_only) {
      if (word.size() > 1 && word[0] == '-' &&
          std::all_of(word.begin() + 1, word.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        fail("shape has a negative extent ", word);
      }
      fail("shape extents must be non-negative integers, found ",
           word.empty() ? describe_next() : ::sapattn::detail::concat("'", detail::printable(word), "'"));
    }
    int64_t value = 0;
    for (const char c : word) {
      const int digit = c - '0';
      if (value > (std::numeric_limits<int64_t>::max() - digit) / 10) {
        fail("shape extent ", word, " is too large");
      }
      value = value * 10 + digit;
    }
    pos_ += word.size();
    return value;
  }

  std::vector<int64_t> parse_shape() {
    expect('(', "shape must be a tuple such as (2, 3)");
    std::vector<int64_t> shape;
    skip_whitespace();
    bool trailing_comma = false;
    while (!peek_is(')')) {
      // Collect every extent before judging the rank, so that the message can state it.
      shape.push_back(parse_extent());
      skip_whitespace();
      trailing_comma = peek_is(',');
      if (trailing_comma) {
        ++pos_;
        skip_whitespace();
      } else if (!peek_is(')')) {
        fail("expected ',' or ')' in the shape tuple, found ", describe_next());
      }
    }
    // In Python "(5)" is the integer 5, not a tuple; NumPy rejects it too.
    if (shape.size() == 1 && !trailing_comma) {
      fail("shape (", shape[0], ") is not a tuple; write (", shape[0], ",)");
    }
    ++pos_;
    if (shape.size() > static_cast<size_t>(kMaxRank)) {
      fail("shape ", detail::shape_string(shape), " has rank ", shape.size(), "; at most ", kMaxRank, " is supported");
    }
    return shape;
  }

  std::string_view text_;
  const std::string& where_;
  size_t pos_ = 0;
};

uint32_t read_le(const std::byte* p, size_t n) {
  uint32_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

Tensor parse_npy_from(std::span<const std::byte> bytes, const std::string& where) {
  const size_t size = bytes.size();
  const auto* chars = reinterpret_cast<const char*>(bytes.data());
  SAPATTN_CHECK(size > 0, FormatError, where, ": empty input; an npy file starts with \"\\x93NUMPY\"");
  const size_t magic_seen = std::min(size, kMagic.size());
  SAPATTN_CHECK(std::string_view(chars, magic_seen) == kMagic.substr(0, magic_seen), FormatError, where,
                ": not an npy file: it does not start with \"\\x93NUMPY\" (found \"",
                detail::printable(std::string_view(chars, magic_seen)), "\")");
  SAPATTN_CHECK(size >= kMagic.size() + 2, FormatError, where, ": truncated: ", size,
                " bytes end before the magic string and version");
  const auto major = static_cast<unsigned>(bytes[6]);
  const auto minor = static_cast<unsigned>(bytes[7]);
  SAPATTN_CHECK((major == 1 || major == 2 || major == 3) && minor == 0, FormatError, where,
                ": unsupported npy format version ", major, ".", minor, " (1.0, 2.0 and 3.0 are read)");

  const size_t length_bytes = major == 1 ? 2 : 4;
  const size_t prefix = kMagic.size() + 2 + length_bytes;
  SAPATTN_CHECK(size >= prefix, FormatError, where, ": truncated: ", size, " bytes end inside the header length field");
  const size_t header_length = read_le(bytes.data() + 8, length_bytes);
  SAPATTN_CHECK(header_length <= size - prefix, FormatError, where, ": header length ", header_length,
                " runs past the end of the input (", size - prefix, " bytes follow the length field)");
  const std::string_view text(chars + prefix, header_length);
  const NpyHeader h = HeaderParser(text, where).parse();

  DType dtype;
  if (h.descr == "<f4") {
    dtype = DType::F32;
  } else if (h.descr == "<f2") {
    dtype = DType::F16;
  } else {
    const std::string descr = detail::printable(h.descr);
    SAPATTN_CHECK(!h.descr.starts_with(">"), FormatError, where, ": descr '", descr,
                  "' is big-endian; only '<f4' and '<f2' are read (convert with arr.astype('<f4'))");
    SAPATTN_THROW(FormatError, where, ": descr '", descr,
                  "' is not supported; only '<f4' (float32) and '<f2' (float16) are read");
  }
  SAPATTN_CHECK(!h.fortran_order, FormatError, where,
                ": data is in Fortran (column-major) order; save np.ascontiguousarray(arr) instead");

  const size_t itemsize = dtype_size(dtype);
  const std::optional<int64_t> expected = detail::checked_byte_size(h.shape, itemsize);
  const size_t found = size - prefix - header_length;
  SAPATTN_CHECK(expected.has_value(), FormatError, where, ": shape ", detail::shape_string(h.shape), " '", h.descr,
                "' holds more bytes than fit in int64");
  const auto needed = static_cast<uint64_t>(*expected);
  SAPATTN_CHECK(needed <= found, FormatError, where, ": truncated data: shape ", detail::shape_string(h.shape), " '",
                h.descr, "' needs ", needed, " bytes but ", found, " follow the header");
  SAPATTN_CHECK(needed == found, FormatError, where, ": ", found - needed, " unexpected bytes after the data (",
                "shape ", detail::shape_string(h.shape), " '", h.descr, "' needs ", needed, ", found ", found, ")");

  Tensor t(dtype, h.shape);
  if (needed > 0) std::memcpy(t.data(), bytes.data() + prefix + header_length, needed);
  return t;
}

// Python's repr of the shape tuple: "()", "(5,)", "(2, 3)".
std::string shape_repr(const TensorView& t) {
  std::string out = "(";
  for (int i = 0; i < t.rank; ++i) {
    if (i) out += ", ";
    out += std::to_string(t.shape[i]);
  }
  if (t.rank == 1) out += ',';
  return out + ")";
}

}  // namespace

Tensor parse_npy(std::span<const std::byte> bytes) { return parse_npy_from(bytes, "npy data"); }

Tensor read_npy(const std::string& path) { return parse_npy_from(detail::read_file(path), "npy file '" + path + "'"); }

std::vector<std::byte> serialize_npy(const TensorView& t) {
  std::string_view descr;
  switch (t.dtype) {
    case DType::F32:
      descr = "<f4";
      break;
    case DType::F16:
      descr = "<f2";
      break;
    case DType::BF16:
      SAPATTN_THROW(DTypeError, "serialize_npy: NumPy has no bf16 type; use safetensors (write_safetensors) ",
                    "for bf16 tensors, or convert to f32");
    default:
      SAPATTN_THROW(DTypeError, "serialize_npy: dtype ", dtype_name(t.dtype),
                    " is not supported; only f32 and f16 are written");
  }
  detail::check_serializable(t, "serialize_npy");

  std::string dict =
      "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': " + shape_repr(t) + ", }";
  // NumPy also reserves room for the first extent to grow to 21 digits. For rank <= 4 and a byte size
  // that fits int64 the dict plus that room always fits the first 128 bytes, so padding to the
  // 64-byte boundary yields NumPy's bytes without it. Version 1.0 stores the header length in 2
  // bytes; a longer header needs 2.0 (never for rank <= 4, but it is NumPy's rule).
  int major = 1;
  size_t prefix = kMagic.size() + 2 + 2;
  size_t padded = (prefix + dict.size() + 1 + kAlign - 1) / kAlign * kAlign - prefix;
  if (padded > 0xffff) {
    major = 2;
    prefix = kMagic.size() + 2 + 4;
    padded = (prefix + dict.size() + 1 + kAlign - 1) / kAlign * kAlign - prefix;
  }
  dict.append(padded - dict.size() - 1, ' ');
  dict += '\n';

  std::vector<std::byte> out;
  out.reserve(prefix + padded + static_cast<size_t>(t.numel()) * dtype_size(t.dtype));
  const auto append = [&](std::string_view s) {
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    out.insert(out.end(), p, p + s.size());
  };
  append(kMagic);
  out.push_back(static_cast<std::byte>(major));
  out.push_back(std::byte{0});
  for (size_t i = 0; i < prefix - kMagic.size() - 2; ++i) {
    out.push_back(static_cast<std::byte>(padded >> (8 * i)));
  }
  append(dict);
  detail::append_row_major(t, out);
  return out;
}

void write_npy(const std::string& path, const TensorView& t) { detail::write_file(path, serialize_npy(t)); }

}  // namespace sapattn::io
