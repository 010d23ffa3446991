// Tensor-file I/O: .npy and .safetensors round trips, byte-exact compatibility with NumPy's writer,
// hand-written files, one test per kind of malformed input, and a mutation sweep checking that no
// input bytes produce anything but a tensor or a FormatError.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "io/json.hpp"
#include "sapattn/error.hpp"
#include "sapattn/io.hpp"
#include "sapattn/tensor.hpp"

namespace {

using sapattn::DType;
using sapattn::Tensor;
using sapattn::TensorView;
namespace io = sapattn::io;
using namespace std::string_literals;
using namespace std::string_view_literals;

std::vector<std::byte> to_bytes(std::string_view s) {
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  return {p, p + s.size()};
}

std::string to_string(const std::vector<std::byte>& b) { return {reinterpret_cast<const char*>(b.data()), b.size()}; }

// Seeded values in [-4, 4) stored in `dtype` (rounded for the 16-bit types).
Tensor random_tensor(DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  Tensor t(dtype, std::move(shape));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  for (int64_t i = 0; i < t.numel(); ++i) sapattn::store_from_f32(t.data(), dtype, i, dist(rng));
  return t;
}

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

// Same dtype, shape and bits.
::testing::AssertionResult SameTensor(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype()) {
    return ::testing::AssertionFailure() << "dtype " << sapattn::dtype_name(a.dtype()) << " vs "
                                         << sapattn::dtype_name(b.dtype());
  }
  if (a.shape() != b.shape()) {
    return ::testing::AssertionFailure() << "shape " << a.view().describe() << " vs " << b.view().describe();
  }
  if (a.bytes() > 0 && std::memcmp(a.data(), b.data(), a.bytes()) != 0) {
    return ::testing::AssertionFailure() << "data differs for " << a.view().describe();
  }
  return ::testing::AssertionSuccess();
}

// `f` throws exactly ErrorType (not merely some exception) whose message contains `needle`.
template <typename ErrorType, typename F>
::testing::AssertionResult Throws(F&& f, std::string_view needle = "") {
  try {
    f();
  } catch (const ErrorType& e) {
    if (std::string_view(e.what()).find(needle) == std::string_view::npos) {
      return ::testing::AssertionFailure() << "message lacks \"" << needle << "\": " << e.what();
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw another exception type: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

template <typename F>
::testing::AssertionResult ThrowsFormatError(F&& f, std::string_view needle = "") {
  return Throws<sapattn::FormatError>(std::forward<F>(f), needle);
}

::testing::AssertionResult NpyRejects(const std::string& file, std::string_view needle = "") {
  return ThrowsFormatError([&] { io::parse_npy(to_bytes(file)); }, needle);
}

::testing::AssertionResult SafetensorsRejects(const std::string& file, std::string_view needle = "") {
  return ThrowsFormatError([&] { io::parse_safetensors(to_bytes(file)); }, needle);
}

// ---------------------------------------------------------------------------------------------
// .npy

// A version-`major` npy file around `dict`, padded like NumPy's, followed by `data`.
std::string npy_file(std::string_view dict, const std::string& data, int major = 1) {
  const size_t prefix = major == 1 ? 10 : 12;
  std::string header(dict);
  header.append(63 - (prefix + header.size()) % 64, ' ');
  header += '\n';
  std::string out = "\x93NUMPY"s + static_cast<char>(major) + '\0';
  for (size_t i = 0; i < prefix - 8; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

constexpr std::string_view kDict23 = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

TEST(NpyRoundTrip, F32AndF16AcrossShapes) {
  const std::vector<std::vector<int64_t>> shapes = {{}, {0}, {7}, {3, 4}, {2, 3, 5, 7}, {4, 0, 2}, {1, 1, 1, 1}};
  uint32_t seed = 1;
  for (DType dtype : {DType::F32, DType::F16}) {
    for (const auto& shape : shapes) {
      const Tensor t = random_tensor(dtype, shape, seed++);
      SCOPED_TRACE(t.view().describe());
      const std::vector<std::byte> file = io::serialize_npy(t.view());
      EXPECT_EQ(file.size() % 64, t.bytes() % 64) << "data must start at a multiple of 64";
      EXPECT_TRUE(SameTensor(io::parse_npy(file), t));
    }
  }
}

TEST(NpyRoundTrip, BshdStridedViewIsWrittenRowMajor) {
  const int64_t B = 2, H = 3, S = 5, D = 4;
  const Tensor memory = random_tensor(DType::F32, {B, S, H, D}, 11);  // diffusers layout
  const TensorView view = TensorView::bshd(memory.data(), DType::F32, B, H, S, D);
  ASSERT_FALSE(view.is_contiguous());
  const Tensor back = io::parse_npy(io::serialize_npy(view));
  ASSERT_EQ(back.shape(), (std::vector<int64_t>{B, H, S, D}));
  const float* src = memory.data_as<float>();
  const float* dst = back.data_as<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d) {
          ASSERT_EQ(dst[((b * H + h) * S + s) * D + d], src[((b * S + s) * H + h) * D + d])
              << "at b=" << b << " h=" << h << " s=" << s << " d=" << d;
        }
}

TEST(NpyRoundTrip, SlicedF16ViewIsWrittenRowMajor) {
  const Tensor full = random_tensor(DType::F16, {3, 6, 4}, 12);
  const TensorView view = full.view().slice(1, 2, 5);  // [3,3,4], rows 2..4 of each block
  const Tensor back = io::parse_npy(io::serialize_npy(view));
  ASSERT_EQ(back.shape(), (std::vector<int64_t>{3, 3, 4}));
  const auto* src = full.data_as<uint16_t>();
  const auto* dst = back.data_as<uint16_t>();
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 3; ++j)
      for (int64_t k = 0; k < 4; ++k) ASSERT_EQ(dst[(i * 3 + j) * 4 + k], src[(i * 6 + j + 2) * 4 + k]);
}

TEST(NpyFormat, ParsesNumpyWrittenBytes) {
  // np.save of np.array([[1.5, -2.25, 0.125], [3, -0.5, 100]], np.float32) with NumPy 1.x or 2.x:
  // 10-byte preamble, header length 118 (0x76), dict, spaces up to byte 127, '\n', data.
  const std::string file = "\x93NUMPY\x01\x00\x76\x00"s + std::string(kDict23) + std::string(58, ' ') + "\n" +
                           "\x00\x00\xc0\x3f\x00\x00\x10\xc0\x00\x00\x00\x3e"s +
                           "\x00\x00\x40\x40\x00\x00\x00\xbf\x00\x00\xc8\x42"s;
  ASSERT_EQ(file.size(), 128u + 24u);
  const Tensor t = io::parse_npy(to_bytes(file));
  ASSERT_EQ(t.dtype(), DType::F32);
  ASSERT_EQ(t.shape(), (std::vector<int64_t>{2, 3}));
  const std::vector<float> expected = {1.5f, -2.25f, 0.125f, 3.0f, -0.5f, 100.0f};
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_EQ(t.data_as<float>()[i], expected[i]) << i;
}

TEST(NpyFormat, WriterIsByteIdenticalToNumpy) {
  const std::vector<float> values = {1.5f, -2.25f, 0.125f, 3.0f, -0.5f, 100.0f};
  Tensor t(DType::F32, {2, 3});
  std::memcpy(t.data(), values.data(), t.bytes());
  const std::string expected = "\x93NUMPY\x01\x00\x76\x00"s + std::string(kDict23) + std::string(58, ' ') + "\n" +
                               "\x00\x00\xc0\x3f\x00\x00\x10\xc0\x00\x00\x00\x3e"s +
                               "\x00\x00\x40\x40\x00\x00\x00\xbf\x00\x00\xc8\x42"s;
  EXPECT_EQ(to_string(io::serialize_npy(t.view())), expected);

  // np.save of np.float16([0.5, -1, 2, 0.25, 3]): rank 1 is written "(5,)".
  Tensor h(DType::F16, {5});
  const uint16_t halves[] = {0x3800, 0xbc00, 0x4000, 0x3400, 0x4200};
  std::memcpy(h.data(), halves, sizeof halves);
  const std::string dict5 = "{'descr': '<f2', 'fortran_order': False, 'shape': (5,), }";
  EXPECT_EQ(to_string(io::serialize_npy(h.view())), "\x93NUMPY\x01\x00\x76\x00"s + dict5 +
                                                        std::string(117 - dict5.size(), ' ') + "\n" +
                                                        "\x00\x38\x00\xbc\x00\x40\x00\x34\x00\x42"s);

  // np.save of np.float32(-7.0): a rank-0 array, shape "()".
  Tensor s(DType::F32, {});
  *s.data_as<float>() = -7.0f;
  const std::string dict0 = "{'descr': '<f4', 'fortran_order': False, 'shape': (), }";
  EXPECT_EQ(to_string(io::serialize_npy(s.view())),
            "\x93NUMPY\x01\x00\x76\x00"s + dict0 + std::string(117 - dict0.size(), ' ') + "\n" + "\x00\x00\xe0\xc0"s);
}

TEST(NpyFormat, AcceptsVersions2And3AndLooseSyntax) {
  const std::string data = random_bytes(24, 21);
  Tensor expected(DType::F32, {2, 3});
  std::memcpy(expected.data(), data.data(), data.size());
  for (int major : {1, 2, 3}) {
    EXPECT_TRUE(SameTensor(io::parse_npy(to_bytes(npy_file(kDict23, data, major))), expected)) << major;
  }
  // Other key order, double quotes, no trailing comma, tabs and newlines, a trailing comma in the
  // tuple: all valid Python literals that other writers emit.
  const std::string loose = "{\"shape\":(2,3,),\t\"fortran_order\" : False,\n'descr':\"<f4\"}";
  EXPECT_TRUE(SameTensor(io::parse_npy(to_bytes(npy_file(loose, data))), expected));
  // A header that does not pad the data to 64 bytes is still read.
  const std::string unaligned =
      "\x93NUMPY\x01\x00"s + static_cast<char>(kDict23.size()) + '\0' + std::string(kDict23) + data;
  EXPECT_TRUE(SameTensor(io::parse_npy(to_bytes(unaligned)), expected));
  // A version 2.0 header longer than 65535 bytes (all padding).
  const std::string big = std::string(kDict23) + std::string(70000, ' ');
  EXPECT_TRUE(SameTensor(io::parse_npy(to_bytes(npy_file(big, data, 2))), expected));
}

TEST(NpyFormat, AcceptsScalarAndEmptyArrays) {
  // Rank 0 is accepted: np.save(np.float32(x)) writes it and Tensor has rank 0.
  const Tensor s =
      io::parse_npy(to_bytes(npy_file("{'descr': '<f2', 'fortran_order': False, 'shape': (), }", "\x00\x3c"s)));
  EXPECT_EQ(s.dtype(), DType::F16);
  EXPECT_TRUE(s.shape().empty());
  EXPECT_EQ(*s.data_as<uint16_t>(), 0x3c00);
  const Tensor e =
      io::parse_npy(to_bytes(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 0, 5), }", "")));
  EXPECT_EQ(e.shape(), (std::vector<int64_t>{3, 0, 5}));
  EXPECT_EQ(e.numel(), 0);
}

TEST(NpyErrors, Preamble) {
  const std::string good = npy_file(kDict23, random_bytes(24, 31));
  EXPECT_TRUE(NpyRejects("", "empty"));
  EXPECT_TRUE(NpyRejects("\x93NUM", "truncated"));
  EXPECT_TRUE(NpyRejects("\x93NUMPY\x01"s, "truncated"));
  EXPECT_TRUE(NpyRejects("PK\x03\x04" + good.substr(4), "not an npy file"));
  EXPECT_TRUE(NpyRejects("\x93numpy" + good.substr(6), "not an npy file"));
  for (std::string version : {"\x04\x00"s, "\x01\x01"s, "\x00\x00"s}) {
    EXPECT_TRUE(NpyRejects(good.substr(0, 6) + version + good.substr(8), "unsupported npy format version"));
  }
  EXPECT_TRUE(NpyRejects(good.substr(0, 9), "truncated"));
  EXPECT_TRUE(NpyRejects("\x93NUMPY\x02\x00\x10\x00\x00"s, "truncated"));
  // Header length past the end of the file.
  std::string past = good;
  past[8] = '\xff';
  past[9] = '\x7f';
  EXPECT_TRUE(NpyRejects(past, "runs past the end"));
  EXPECT_TRUE(NpyRejects(good.substr(0, 100), "runs past the end"));
}

TEST(NpyErrors, HeaderSyntax) {
  const std::string data = random_bytes(24, 41);
  // A header length that lies: too short cuts the dict, too long swallows the data.
  std::string short_len = npy_file(kDict23, data);
  short_len[8] = 40;
  EXPECT_TRUE(NpyRejects(short_len));
  std::string long_len = npy_file(kDict23, data);
  long_len[8] = static_cast<char>(118 + 8);
  EXPECT_TRUE(NpyRejects(long_len));

  EXPECT_TRUE(NpyRejects(npy_file("[1, 2, 3]", data), "dict"));
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", data)));
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } x", data),
                         "after the header dict"));
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '<f4', 'shape': (2, 3), }", data), "'fortran_order'"));
  EXPECT_TRUE(NpyRejects(npy_file("{'fortran_order': False, 'shape': (2, 3), }", data), "'descr'"));
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '<f4', 'fortran_order': False, }", data), "'shape'"));
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1, }", data),
                         "unexpected key 'x'"));
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", data),
                         "twice"));
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3), }", data), "True or False"));
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3), }", data)));
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '\\x3cf4', 'fortran_order': False, 'shape': (2, 3), }", data), "escapes"));
}

TEST(NpyErrors, UnsupportedDescr) {
  const std::string data = random_bytes(24, 51);
  const auto with_descr = [&](std::string_view descr) {
    return npy_file("{'descr': " + std::string(descr) + ", 'fortran_order': False, 'shape': (2, 3), }", data);
  };
  EXPECT_TRUE(NpyRejects(with_descr("'>f4'"), "big-endian"));
  EXPECT_TRUE(NpyRejects(with_descr("'>f2'"), "big-endian"));
  EXPECT_TRUE(NpyRejects(with_descr("'|f4'"), "'|f4' is not supported"));
  EXPECT_TRUE(NpyRejects(with_descr("'f4'"), "'f4' is not supported"));
  EXPECT_TRUE(NpyRejects(with_descr("'<f8'"), "'<f8' is not supported; only '<f4'"));
  EXPECT_TRUE(NpyRejects(with_descr("'<i4'"), "'<i4' is not supported"));
  EXPECT_TRUE(NpyRejects(with_descr("[('a', '<f4')]"), "structured"));
}

TEST(NpyErrors, FortranOrder) {
  EXPECT_TRUE(NpyRejects(npy_file("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", random_bytes(24, 61)),
                         "np.ascontiguousarray"));
}

TEST(NpyErrors, BadShapes) {
  const auto with_shape = [](std::string_view shape, size_t data_bytes = 24) {
    return npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': " + std::string(shape) + ", }",
                    random_bytes(data_bytes, 71));
  };
  EXPECT_TRUE(NpyRejects(with_shape("(2, -3)"), "negative extent -3"));
  EXPECT_TRUE(NpyRejects(with_shape("(2, 3.0)"), "'3.0'"));
  EXPECT_TRUE(NpyRejects(with_shape("(2, x)"), "non-negative integers"));
  EXPECT_TRUE(NpyRejects(with_shape("(6)"), "not a tuple"));
  EXPECT_TRUE(NpyRejects(with_shape("[2, 3]"), "tuple"));
  EXPECT_TRUE(NpyRejects(with_shape("(2, 3 }"), "expected ',' or ')'"));
  EXPECT_TRUE(NpyRejects(with_shape("(1, 2, 1, 3, 1)"), "rank 5"));
  EXPECT_TRUE(NpyRejects(with_shape("(99999999999999999999, 1)"), "too large"));
  EXPECT_TRUE(NpyRejects(with_shape("(4294967296, 4294967296)"), "int64"));
  // Zero elements do not excuse an overflowing product: strides are computed from the others.
  EXPECT_TRUE(NpyRejects(with_shape("(0, 4294967296, 4294967296)", 0), "int64"));
}

TEST(NpyErrors, DataSizeMismatch) {
  const std::string data = random_bytes(28, 81);
  EXPECT_TRUE(NpyRejects(npy_file(kDict23, data.substr(0, 20)), "needs 24 bytes but 20 follow"));
  EXPECT_TRUE(NpyRejects(npy_file(kDict23, ""), "needs 24 bytes but 0 follow"));
  EXPECT_TRUE(NpyRejects(npy_file(kDict23, data), "4 unexpected bytes after the data"));
}

TEST(NpyWriter, RejectsBf16AndOtherDtypes) {
  const Tensor bf = random_tensor(DType::BF16, {2, 3}, 91);
  EXPECT_TRUE(Throws<sapattn::DTypeError>([&] { io::serialize_npy(bf.view()); }, "use safetensors"));
  Tensor i32(DType::I32, {4});
  std::memset(i32.data(), 0x5a, i32.bytes());
  EXPECT_TRUE(Throws<sapattn::DTypeError>([&] { io::serialize_npy(i32.view()); }, "i32"));
}

TEST(NpyWriter, RejectsDeviceTensorsAndMissingData) {
  const Tensor t = random_tensor(DType::F32, {2, 3}, 92);
  TensorView on_gpu = t.view();
  on_gpu.device = sapattn::Device::cuda(0);
  EXPECT_TRUE(Throws<sapattn::UnsupportedError>([&] { io::serialize_npy(on_gpu); }, "CPU"));
  TensorView no_data = t.view();
  no_data.data = nullptr;
  EXPECT_TRUE(Throws<sapattn::InvalidArgumentError>([&] { io::serialize_npy(no_data); }, "no data"));
}

// ---------------------------------------------------------------------------------------------
// .safetensors

// A safetensors file: size field, `header` as given, `data`.
std::string safetensors_file(std::string_view header, const std::string& data) {
  std::string out;
  for (int i = 0; i < 8; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + std::string(header) + data;
}

TEST(SafetensorsRoundTrip, AllDtypesAndShapes) {
  const std::vector<std::pair<std::string, Tensor>> tensors = {
      {"blocks.0.attn.q", random_tensor(DType::F32, {2, 3, 5, 7}, 101)},
      {"k_f16", random_tensor(DType::F16, {4, 8}, 102)},
      {"v_bf16", random_tensor(DType::BF16, {3}, 103)},
      {"scalar", random_tensor(DType::F32, {}, 104)},
      {"empty", random_tensor(DType::BF16, {0, 5}, 105)},
      {"caf\xc3\xa9 \"quoted\"\\", random_tensor(DType::F16, {1, 2, 1, 2}, 106)},
  };
  std::vector<std::pair<std::string, TensorView>> views;
  for (const auto& [name, t] : tensors) views.emplace_back(name, t.view());
  const std::vector<std::byte> file = io::serialize_safetensors(views);
  const std::map<std::string, Tensor> back = io::parse_safetensors(file);
  ASSERT_EQ(back.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_EQ(back.count(name), 1u);
    EXPECT_TRUE(SameTensor(back.at(name), t));
  }
}

TEST(SafetensorsRoundTrip, BshdStridedView) {
  const int64_t B = 1, H = 4, S = 6, D = 8;
  const Tensor memory = random_tensor(DType::BF16, {B, S, H, D}, 111);
  const TensorView view = TensorView::bshd(memory.data(), DType::BF16, B, H, S, D);
  const Tensor back = io::parse_safetensors(io::serialize_safetensors({{"x", view}})).at("x");
  ASSERT_EQ(back.shape(), (std::vector<int64_t>{B, H, S, D}));
  const auto* src = memory.data_as<uint16_t>();
  const auto* dst = back.data_as<uint16_t>();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t d = 0; d < D; ++d) ASSERT_EQ(dst[(h * S + s) * D + d], src[(s * H + h) * D + d]);
}

TEST(SafetensorsRoundTrip, TransposedViewWithNonUnitInnerStride) {
  const Tensor memory = random_tensor(DType::F32, {3, 5}, 112);
  TensorView transposed = memory.view();  // logical [5,3] over [3,5] memory
  transposed.shape = {5, 3, 0, 0};
  transposed.stride = {1, 5, 0, 0};
  const Tensor back = io::parse_safetensors(io::serialize_safetensors({{"t", transposed}})).at("t");
  ASSERT_EQ(back.shape(), (std::vector<int64_t>{5, 3}));
  for (int64_t i = 0; i < 5; ++i) {
    for (int64_t j = 0; j < 3; ++j) ASSERT_EQ(back.data_as<float>()[i * 3 + j], memory.data_as<float>()[j * 5 + i]);
  }
}

TEST(SafetensorsRoundTrip, NoTensors) {
  const std::vector<std::byte> file = io::serialize_safetensors({});
  EXPECT_EQ(to_string(file), "\x08\x00\x00\x00\x00\x00\x00\x00{}      "s);
  EXPECT_TRUE(io::parse_safetensors(file).empty());
}

TEST(SafetensorsWriter, HeaderLayoutAndOrder) {
  const Tensor a = random_tensor(DType::F32, {2, 3}, 121);
  const Tensor b = random_tensor(DType::BF16, {4}, 122);
  const std::vector<std::byte> file = io::serialize_safetensors({{"b", b.view()}, {"a", a.view()}});
  const std::string header =
      "{\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,8]},"
      "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[8,32]}}";
  const std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  const std::string expected = safetensors_file(
      padded, std::string(static_cast<const char*>(b.data()), 8) + std::string(static_cast<const char*>(a.data()), 24));
  EXPECT_EQ(padded.size() % 8, 0u);
  EXPECT_EQ(to_string(file), expected);
}

TEST(SafetensorsFormat, ParsesHandWrittenFile) {
  // Keys in another order, whitespace, metadata, a \u escape (e-acute) and an escaped quote in a name.
  const std::string header = R"( {
    "__metadata__": {"format": "pt", "note": "line\nbreak"},
    "w\u00e9ight": {"shape": [2], "data_offsets": [0, 8], "dtype": "F32"},
    "h\"alf" : { "dtype" : "F16" , "shape" : [ 1 , 2 ] , "data_offsets" : [ 8 , 12 ] },
    "b": {"dtype": "BF16", "data_offsets": [12, 14], "shape": []}
  } )";
  const std::string data =
      "\x00\x00\xc0\x3f\x00\x00\x10\xc0"s  // f32 1.5, -2.25
      "\x00\x3c\x00\xc0"s                  // f16 1, -2
      "\x80\x3f"s;                         // bf16 1
  const std::map<std::string, Tensor> t = io::parse_safetensors(to_bytes(safetensors_file(header, data)));
  ASSERT_EQ(t.size(), 3u);
  const Tensor& w = t.at("w\xc3\xa9ight");
  EXPECT_EQ(w.dtype(), DType::F32);
  EXPECT_EQ(w.shape(), (std::vector<int64_t>{2}));
  EXPECT_EQ(w.data_as<float>()[0], 1.5f);
  EXPECT_EQ(w.data_as<float>()[1], -2.25f);
  const Tensor& h = t.at("h\"alf");
  EXPECT_EQ(h.dtype(), DType::F16);
  EXPECT_EQ(h.shape(), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(sapattn::f16_to_f32(h.data_as<uint16_t>()[0]), 1.0f);
  EXPECT_EQ(sapattn::f16_to_f32(h.data_as<uint16_t>()[1]), -2.0f);
  const Tensor& b = t.at("b");
  EXPECT_EQ(b.dtype(), DType::BF16);
  EXPECT_TRUE(b.shape().empty());
  EXPECT_EQ(sapattn::bf16_to_f32(*b.data_as<uint16_t>()), 1.0f);
  // A surrogate pair decodes to one 4-byte UTF-8 character (U+1F600).
  const std::string emoji = R"({"\ud83d\ude00":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})";
  EXPECT_EQ(io::parse_safetensors(to_bytes(safetensors_file(emoji, "\x00\x00\x80\x3f"s))).count("\xf0\x9f\x98\x80"),
            1u);
}

TEST(SafetensorsErrors, Preamble) {
  const std::string header = R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  const std::string good = safetensors_file(header, random_bytes(4, 131));
  ASSERT_EQ(io::parse_safetensors(to_bytes(good)).size(), 1u);
  EXPECT_TRUE(SafetensorsRejects("", "shorter than the 8-byte"));
  EXPECT_TRUE(SafetensorsRejects("\x10\x00\x00"s, "shorter than the 8-byte"));
  EXPECT_TRUE(SafetensorsRejects(std::string(8, '\0') + header, "header size is 0"));
  std::string past = good;
  past[0] = static_cast<char>(header.size() + 5);
  EXPECT_TRUE(SafetensorsRejects(past, "runs past the end"));
  std::string huge = good;
  huge[7] = '\x01';
  EXPECT_TRUE(SafetensorsRejects(huge, "runs past the end"));
  std::string lying = good;
  lying[0] = static_cast<char>(header.size() - 3);  // cuts the JSON
  EXPECT_TRUE(SafetensorsRejects(lying, "invalid JSON"));
}

TEST(SafetensorsErrors, JsonSyntax) {
  const std::string data = random_bytes(4, 141);
  const auto rejects = [&](std::string_view header, std::string_view needle) {
    return SafetensorsRejects(safetensors_file(header, data), needle);
  };
  const std::string entry = R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  EXPECT_TRUE(rejects("hello world", "invalid JSON"));
  EXPECT_TRUE(rejects(R"([{"x":1}])", "found an array"));
  EXPECT_TRUE(rejects("\"x\"", "found a string"));
  EXPECT_TRUE(rejects(R"({"x":)" + entry, "unterminated object"));
  EXPECT_TRUE(rejects(R"({"x)", "unterminated string"));
  EXPECT_TRUE(rejects(R"({"x\q":)" + entry + "}", "invalid escape '\\q'"));
  EXPECT_TRUE(rejects(R"({"x\u12G4":)" + entry + "}", "4 hex digits"));
  EXPECT_TRUE(rejects(R"({"x\ud800":)" + entry + "}", "high surrogate"));
  EXPECT_TRUE(rejects(R"({"x\udc00":)" + entry + "}", "unpaired low surrogate"));
  EXPECT_TRUE(rejects("{\"x\ty\":" + entry + "}", "raw control byte"));
  EXPECT_TRUE(rejects("{\"x\xff\":" + entry + "}", "invalid UTF-8"));
  EXPECT_TRUE(rejects("{\"x\xc0\xaf\":" + entry + "}", "invalid UTF-8"));  // overlong '/'
  EXPECT_TRUE(rejects(R"({"x":)" + entry + R"(,"x":)" + entry + "}", "duplicate key \"x\""));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "duplicate"));
  EXPECT_TRUE(rejects(R"({"x":)" + entry + "} {}", "after the JSON value"));
  EXPECT_TRUE(rejects(R"({"x":)" + entry + ",}", "expected a string key"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}})", "leading zero"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", "not an integer"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}})", "not an integer"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,99999999999999999999]}})",
                      "does not fit in 64 bits"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"y":tru})", "unexpected"));
  const std::string deep = R"({"__metadata__":)" + std::string(100, '[') + std::string(100, ']') + "}";
  EXPECT_TRUE(rejects(deep, "nested deeper than 64"));
}

// Other JSON files (the generator's workload.json) hold fractions: a parse may allow them.
TEST(Json, FractionsOnlyWhenAllowed) {
  namespace detail = sapattn::io::detail;
  using Kind = detail::JsonValue::Kind;
  const auto any = [](std::string_view text) { return detail::parse_json(text, "t", detail::JsonNumbers::kAny); };
  EXPECT_THROW(detail::parse_json("0.5", "t"), sapattn::FormatError);
  for (const auto& [text, value] : std::vector<std::pair<std::string_view, double>>{
           {"0.5", 0.5}, {"-2.25", -2.25}, {"1e3", 1000.0}, {"2.5E-2", 0.025}, {"-0.0", -0.0}, {"7e+1", 70.0}}) {
    const detail::JsonValue v = any(text);
    EXPECT_EQ(v.kind, Kind::kNumber) << text;
    EXPECT_DOUBLE_EQ(v.number, value) << text;
  }
  const detail::JsonValue object = any(R"({"n": 3, "x": 0.875})");
  EXPECT_EQ(object.find("n")->kind, Kind::kInt);
  EXPECT_EQ(object.find("n")->integer, 3);
  EXPECT_DOUBLE_EQ(object.find("x")->number, 0.875);
  for (std::string_view bad : {"1.", ".5", "1e", "1e+", "01.5", "1.5.2", "1e999"}) {
    EXPECT_THROW(any(bad), sapattn::FormatError) << bad;
  }
}

TEST(SafetensorsErrors, BadEntries) {
  const std::string data = random_bytes(4, 151);
  const auto rejects = [&](std::string_view header, std::string_view needle) {
    return SafetensorsRejects(safetensors_file(header, data), needle);
  };
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"I64","shape":[],"data_offsets":[0,4]}})", "dtype \"I64\""));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F64","shape":[],"data_offsets":[0,4]}})", "dtype \"F64\""));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "not supported"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", "must be a string"));
  EXPECT_TRUE(rejects(R"({"x":{"shape":[1],"data_offsets":[0,4]}})", "lacks \"dtype\""));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","data_offsets":[0,4]}})", "lacks \"shape\""));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[1]}})", "lacks \"data_offsets\""));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"y":0}})", "unexpected key"));
  EXPECT_TRUE(rejects(R"({"x":[0,4]})", "must be an object"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "is negative"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}})", "must be an integer"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":{},"data_offsets":[0,4]}})", "must be an array"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[1,1,1,1,1],"data_offsets":[0,4]}})", "rank 5"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,2,4]}})", "[begin, end]"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,null]}})", "integer"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", "int64"));
  const std::string entry = R"("x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  EXPECT_TRUE(rejects(R"({"__metadata__":[],)" + entry + "}", "\"__metadata__\" must be an object"));
  EXPECT_TRUE(rejects(R"({"__metadata__":{"a":1},)" + entry + "}", "must be a string"));
}

TEST(SafetensorsErrors, BadOffsets) {
  const std::string data = random_bytes(16, 161);
  const auto rejects = [&](std::string_view header, std::string_view needle) {
    return SafetensorsRejects(safetensors_file(header, data), needle);
  };
  // Shape [2] F32 is 8 bytes.
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})",
                      "data_offsets [0, 16) hold 16 bytes but shape [2] F32 needs 8"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})", "16-byte data buffer"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[9,3]}})", "begin after they end"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                      R"("y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                      "overlap"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("y":{"dtype":"F16","shape":[2],"data_offsets":[12,16]}})",
                      "bytes [8, 12) of the data buffer belong to no tensor"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", "at the start"));
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                      "bytes [8, 16) at the end of the data buffer"));
  // The same region claimed twice.
  EXPECT_TRUE(rejects(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                      R"("y":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                      "overlap"));
}

TEST(SafetensorsWriter, RejectsBadNamesAndDtypes) {
  const Tensor t = random_tensor(DType::F32, {2}, 171);
  using Views = std::vector<std::pair<std::string, TensorView>>;
  EXPECT_TRUE(Throws<sapattn::InvalidArgumentError>(
      [&] {
        io::serialize_safetensors(Views{{"a", t.view()}, {"a", t.view()}});
      },
      "twice"));
  EXPECT_TRUE(Throws<sapattn::InvalidArgumentError>(
      [&] {
        io::serialize_safetensors(Views{{"", t.view()}});
      },
      "non-empty"));
  EXPECT_TRUE(Throws<sapattn::InvalidArgumentError>(
      [&] {
        io::serialize_safetensors(Views{{"__metadata__", t.view()}});
      },
      "reserved"));
  EXPECT_TRUE(Throws<sapattn::InvalidArgumentError>(
      [&] {
        io::serialize_safetensors(Views{{"bad\xff", t.view()}});
      },
      "UTF-8"));
  Tensor i32(DType::I32, {2});
  std::memset(i32.data(), 0x33, i32.bytes());
  EXPECT_TRUE(Throws<sapattn::DTypeError>([&] { io::serialize_safetensors(Views{{"i", i32.view()}}); }, "i32"));
}

// ---------------------------------------------------------------------------------------------
// Files and read_tensor

class IoFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("sapattn_test_io_" + std::to_string(::getpid()) + "_" +
                                                     ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string path(std::string_view name) const { return (dir_ / name).string(); }

  std::filesystem::path dir_;
};

TEST_F(IoFiles, WriteThenReadBothFormats) {
  const Tensor q = random_tensor(DType::F16, {2, 3, 5, 7}, 181);
  const Tensor k = random_tensor(DType::BF16, {3, 4}, 182);
  io::write_npy(path("q.npy"), q.view());
  io::write_safetensors(path("qk.safetensors"), {{"q", q.view()}, {"k", k.view()}});
  EXPECT_TRUE(SameTensor(io::read_npy(path("q.npy")), q));
  const auto all = io::read_safetensors(path("qk.safetensors"));
  ASSERT_EQ(all.size(), 2u);
  EXPECT_TRUE(SameTensor(all.at("k"), k));
  // read_tensor picks the reader by extension; for .npy the name is not used.
  EXPECT_TRUE(SameTensor(io::read_tensor(path("q.npy"), "anything"), q));
  EXPECT_TRUE(SameTensor(io::read_tensor(path("qk.safetensors"), "q"), q));
  EXPECT_TRUE(SameTensor(io::read_tensor(path("qk.safetensors"), "k"), k));
  std::filesystem::copy_file(path("q.npy"), path("Q.NPY"));
  EXPECT_TRUE(SameTensor(io::read_tensor(path("Q.NPY"), ""), q));
}

TEST_F(IoFiles, ReadTensorErrors) {
  const Tensor q = random_tensor(DType::F32, {4}, 191);
  io::write_safetensors(path("w.safetensors"), {{"q", q.view()}, {"k", q.view()}});
  EXPECT_TRUE(ThrowsFormatError([&] { io::read_tensor(path("w.safetensors"), "v"); }, "has no tensor 'v'"));
  EXPECT_TRUE(ThrowsFormatError([&] { io::read_tensor(path("w.safetensors"), "v"); }, "'k', 'q'"));
  std::filesystem::copy_file(path("w.safetensors"), path("w.bin"));
  EXPECT_TRUE(ThrowsFormatError([&] { io::read_tensor(path("w.bin"), "q"); }, ".npy or .safetensors"));
}

TEST_F(IoFiles, MissingFilesAreIoErrors) {
  const std::string missing = path("missing.npy");
  EXPECT_TRUE(Throws<sapattn::IoError>([&] { io::read_npy(missing); }, missing));
  EXPECT_TRUE(Throws<sapattn::IoError>([&] { io::read_npy(missing); }, "No such file"));
  EXPECT_TRUE(Throws<sapattn::IoError>([&] { io::read_safetensors(path("missing.safetensors")); }, "missing"));
  EXPECT_TRUE(Throws<sapattn::IoError>([&] { io::read_tensor(missing, "x"); }, missing));
  // A directory opens but cannot be read.
  EXPECT_TRUE(Throws<sapattn::IoError>([&] { io::read_npy(dir_.string()); }, "cannot read"));
  const Tensor t = random_tensor(DType::F32, {3}, 201);
  const std::string unwritable = path("no/such/dir/t.npy");
  EXPECT_TRUE(Throws<sapattn::IoError>([&] { io::write_npy(unwritable, t.view()); }, unwritable));
  EXPECT_TRUE(Throws<sapattn::IoError>([&] { io::write_safetensors(path("no/dir/t.safetensors"), {}); }));
}

TEST_F(IoFiles, FormatErrorsNameTheFile) {
  const std::string npy = path("bad.npy");
  std::ofstream(npy, std::ios::binary) << "\x93NUMPY\x01\x00\x05\x00{'a'}"s;
  EXPECT_TRUE(ThrowsFormatError([&] { io::read_npy(npy); }, "npy file '" + npy + "'"));
  const std::string st = path("bad.safetensors");
  std::ofstream(st, std::ios::binary) << "\x02\x00\x00\x00\x00\x00\x00\x00[]"s;
  EXPECT_TRUE(ThrowsFormatError([&] { io::read_tensor(st, "x"); }, "safetensors file '" + st + "'"));
}

// ---------------------------------------------------------------------------------------------
// Mutation sweep: corrupt valid files at random; each parse must return or throw FormatError.

// Applies 1..4 random edits, favouring the header (where the parsing happens) over the data.
std::string mutate(std::string s, size_t header_end, std::mt19937& rng) {
  const auto pick = [&](size_t n) { return static_cast<size_t>(rng() % std::max<size_t>(n, 1)); };
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits && !s.empty(); ++e) {
    const size_t at = rng() % 4 != 0 ? pick(std::min(header_end, s.size())) : pick(s.size());
    switch (rng() % 6) {
      case 0:
        s[at] = static_cast<char>(rng() & 0xff);
        break;
      case 1:
        s[at] = static_cast<char>(s[at] ^ (1 << (rng() % 8)));
        break;
      case 2:
        s.resize(pick(s.size()));
        break;
      case 3:
        s.insert(at, 1, static_cast<char>(rng() & 0xff));
        break;
      case 4:
        s.erase(at, 1);
        break;
      case 5:  // swap a digit for another: keeps the syntax valid, changes shapes and offsets
        if (s[at] >= '0' && s[at] <= '9') s[at] = static_cast<char>('0' + rng() % 10);
        break;
    }
  }
  return s;
}

template <typename Parse>
void sweep(const std::string& valid, size_t header_end, uint32_t seed, Parse parse) {
  std::mt19937 rng(seed);
  int accepted = 0, rejected = 0;
  for (int i = 0; i < 4000; ++i) {
    const std::string bad = mutate(valid, header_end, rng);
    try {
      parse(to_bytes(bad));
      ++accepted;
    } catch (const sapattn::FormatError&) {
      ++rejected;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "mutant " << i << " threw a non-FormatError: " << e.what();
    }
  }
  // Both outcomes must occur, or the sweep is not exercising the checks.
  EXPECT_GT(accepted, 0);
  EXPECT_GT(rejected, 0);
}

TEST(Mutation, NpyParsesOrThrowsFormatError) {
  const Tensor t = random_tensor(DType::F32, {3, 4}, 211);
  const std::string valid = to_string(io::serialize_npy(t.view()));
  sweep(valid, 128, 212, [](const std::vector<std::byte>& b) { io::parse_npy(b); });
}

TEST(Mutation, SafetensorsParsesOrThrowsFormatError) {
  const Tensor a = random_tensor(DType::F32, {2, 3}, 221);
  const Tensor b = random_tensor(DType::BF16, {4}, 222);
  const Tensor c = random_tensor(DType::F16, {1, 2, 2, 1}, 223);
  const std::string valid =
      to_string(io::serialize_safetensors({{"alpha", a.view()}, {"b\xc3\xa9ta", b.view()}, {"c", c.view()}}));
  size_t header_size = 0;
  for (int i = 0; i < 8; ++i) header_size |= static_cast<size_t>(static_cast<unsigned char>(valid[i])) << (8 * i);
  sweep(valid, 8 + header_size, 224, [](const std::vector<std::byte>& bytes) { io::parse_safetensors(bytes); });
}

}  // namespace
