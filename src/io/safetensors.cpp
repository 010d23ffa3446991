// .safetensors files: an 8-byte little-endian header size N, N bytes of UTF-8 JSON, the data buffer.
// The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// relative to the buffer) plus an optional "__metadata__" object of strings. The format requires
// the tensors to tile the buffer exactly: no overlap, no hole, nothing after the last tensor.
#include <algorithm>
#include <bit>
#include <cctype>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string_view>

#include "io/json.hpp"
#include "io/tensor_bytes.hpp"
#include "sapattn/error.hpp"
#include "sapattn/io.hpp"

namespace sapattn::io {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is copied as is, which assumes a little-endian host");

// The reference implementation refuses larger headers too; the cap keeps a lying size field from
// making us parse (and allocate for) an absurd header.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr std::string_view kMetadataKey = "__metadata__";

using detail::JsonValue;
using Kind = JsonValue::Kind;
using detail::json_kind_name;

struct Entry {
  std::string name;
  DType dtype = DType::F32;
  std::string_view dtype_text;
  std::vector<int64_t> shape;
  int64_t begin = 0;
  int64_t end = 0;
};

std::optional<DType> dtype_from_name(std::string_view s) {
  if (s == "F32") return DType::F32;
  if (s == "F16") return DType::F16;
  if (s == "BF16") return DType::BF16;
  return std::nullopt;
}

std::optional<std::string_view> dtype_to_name(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    default:
      return std::nullopt;
  }
}

// Reads the header entries and checks each against the buffer; the tiling is checked afterwards.
class HeaderReader {
 public:
  HeaderReader(const std::string& where, uint64_t buffer_size) : where_(where), buffer_size_(buffer_size) {}

  std::vector<Entry> read(const JsonValue& root) {
    if (root.kind != Kind::kObject) {
      fail("the header must be a JSON object mapping tensor names to entries, found ", json_kind_name(root.kind));
    }
    std::vector<Entry> entries;
    for (const JsonValue::Member& m : root.object) {
      if (m.key == kMetadataKey) {
        check_metadata(m.value);
      } else {
        entries.push_back(read_entry(m.key, m.value));
      }
    }
    return entries;
  }

 private:
  template <typename... Args>
  [[noreturn]] void fail(const Args&... args) const {
    SAPATTN_THROW(FormatError, where_, ": header: ", args...);
  }

  void check_metadata(const JsonValue& v) const {
    if (v.kind != Kind::kObject) fail("\"__metadata__\" must be an object, found ", json_kind_name(v.kind));
    for (const JsonValue::Member& m : v.object) {
      if (m.value.kind != Kind::kString) {
        fail("\"__metadata__\" value of \"", detail::printable(m.key), "\" must be a string, found ",
             json_kind_name(m.value.kind));
      }
    }
  }

  // A non-negative integer, or fail naming `what`.
  int64_t non_negative(const JsonValue& v, const std::string& what) const {
    if (v.kind != Kind::kInt) fail(what, " must be an integer, found ", json_kind_name(v.kind));
    if (v.integer < 0) fail(what, " is negative (", v.integer, ")");
    return v.integer;
  }

  Entry read_entry(const std::string& name, const JsonValue& v) const {
    const std::string tensor = ::sapattn::detail::concat("tensor '", detail::printable(name), "'");
    if (v.kind != Kind::kObject) {
      fail(tensor, " must be an object with dtype, shape and data_offsets, found ", json_kind_name(v.kind));
    }
    for (const JsonValue::Member& m : v.object) {
      if (m.key != "dtype" && m.key != "shape" && m.key != "data_offsets") {
        fail(tensor, " has unexpected key \"", detail::printable(m.key),
             "\" (an entry holds exactly dtype, shape and data_offsets)");
      }
    }
    const auto field = [&](std::string_view key, Kind kind) -> const JsonValue& {
      const JsonValue* f = v.find(key);
      if (f == nullptr) fail(tensor, " lacks \"", key, "\"");
      if (f->kind != kind) {
        fail(tensor, " \"", key, "\" must be ", json_kind_name(kind), ", found ", json_kind_name(f->kind));
      }
      return *f;
    };

    Entry e;
    e.name = name;
    const JsonValue& dtype = field("dtype", Kind::kString);
    const std::optional<DType> parsed = dtype_from_name(dtype.string);
    if (!parsed) {
      fail(tensor, " has dtype \"", detail::printable(dtype.string),
           "\", which is not supported (F32, F16 and BF16 are read)");
    }
    e.dtype = *parsed;
    e.dtype_text = *dtype_to_name(e.dtype);

    const JsonValue& shape = field("shape", Kind::kArray);
    if (shape.array.size() > static_cast<size_t>(kMaxRank)) {
      fail(tensor, " has rank ", shape.array.size(), "; at most ", kMaxRank, " is supported");
    }
    for (size_t i = 0; i < shape.array.size(); ++i) {
      e.shape.push_back(non_negative(shape.array[i], tensor + " shape[" + std::to_string(i) + "]"));
    }

    const JsonValue& offsets = field("data_offsets", Kind::kArray);
    if (offsets.array.size() != 2) {
      fail(tensor, " data_offsets must be [begin, end], found ", offsets.array.size(), " elements");
    }
    e.begin = non_negative(offsets.array[0], tensor + " data_offsets[0]");
    e.end = non_negative(offsets.array[1], tensor + " data_offsets[1]");
    const std::string range = ::sapattn::detail::concat("[", e.begin, ", ", e.end, ")");
    if (e.begin > e.end) fail(tensor, " data_offsets ", range, " begin after they end");
    if (static_cast<uint64_t>(e.end) > buffer_size_) {
      fail(tensor, " data_offsets ", range, " run past the end of the ", buffer_size_, "-byte data buffer");
    }
    const std::optional<int64_t> needed = detail::checked_byte_size(e.shape, dtype_size(e.dtype));
    if (!needed) {
      fail(tensor, " shape ", detail::shape_string(e.shape), " holds more bytes than fit in int64");
    }
    if (e.end - e.begin != *needed) {
      fail(tensor, " data_offsets ", range, " hold ", e.end - e.begin, " bytes but shape ",
           detail::shape_string(e.shape), " ", e.dtype_text, " needs ", *needed);
    }
    return e;
  }

  const std::string& where_;
  uint64_t buffer_size_;
};

// The tensors must tile [0, buffer_size) exactly.
void check_tiling(std::vector<const Entry*> sorted, uint64_t buffer_size, const std::string& where) {
  std::sort(sorted.begin(), sorted.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  const auto describe = [](const Entry* e) {
    return ::sapattn::detail::concat("tensor '", detail::printable(e->name), "' [", e->begin, ", ", e->end, ")");
  };
  int64_t covered = 0;
  const Entry* previous = nullptr;
  for (const Entry* e : sorted) {
    SAPATTN_CHECK(e->begin >= covered, FormatError, where, ": header: ", describe(previous), " and ", describe(e),
                  " overlap");
    SAPATTN_CHECK(e->begin == covered, FormatError, where, ": header: bytes [", covered, ", ", e->begin,
                  ") of the data buffer belong to no tensor (a hole ",
                  previous ? "after " + describe(previous) : std::string("at the start"), ")");
    covered = e->end;
    previous = e;
  }
  SAPATTN_CHECK(static_cast<uint64_t>(covered) == buffer_size, FormatError, where, ": header: bytes [", covered, ", ",
                buffer_size, ") at the end of the data buffer belong to no tensor");
}

std::map<std::string, Tensor> parse_safetensors_from(std::span<const std::byte> bytes, const std::string& where) {
  const uint64_t size = bytes.size();
  SAPATTN_CHECK(size >= 8, FormatError, where, ": truncated: ", size,
                " bytes, shorter than the 8-byte header size field");
  uint64_t header_size = 0;
  for (int i = 0; i < 8; ++i) header_size |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  SAPATTN_CHECK(header_size > 0, FormatError, where, ": header size is 0; the header must be a JSON object");
  SAPATTN_CHECK(header_size <= size - 8, FormatError, where, ": header size ", header_size,
                " runs past the end of the input (", size - 8, " bytes follow the size field)");
  SAPATTN_CHECK(header_size <= kMaxHeaderBytes, FormatError, where, ": header size ", header_size,
                " exceeds the limit of ", kMaxHeaderBytes, " bytes");

  const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, header_size);
  const JsonValue root = detail::parse_json(text, where + ": header");
  const uint64_t buffer_size = size - 8 - header_size;
  const std::vector<Entry> entries = HeaderReader(where, buffer_size).read(root);

  std::vector<const Entry*> pointers;
  for (const Entry& e : entries) pointers.push_back(&e);
  check_tiling(std::move(pointers), buffer_size, where);

  const std::byte* buffer = bytes.data() + 8 + header_size;
  std::map<std::string, Tensor> out;
  for (const Entry& e : entries) {
    Tensor t(e.dtype, e.shape);
    if (e.end > e.begin) std::memcpy(t.data(), buffer + e.begin, static_cast<size_t>(e.end - e.begin));
    out.emplace(e.name, std::move(t));
  }
  return out;
}

bool has_extension(const std::string& path, std::string_view ext) {
  if (path.size() < ext.size()) return false;
  return std::equal(ext.begin(), ext.end(), path.end() - static_cast<std::ptrdiff_t>(ext.size()),
                    [](char a, char b) { return a == std::tolower(static_cast<unsigned char>(b)); });
}

}  // namespace

std::map<std::string, Tensor> parse_safetensors(std::span<const std::byte> bytes) {
  return parse_safetensors_from(bytes, "safetensors data");
}

std::map<std::string, Tensor> read_safetensors(const std::string& path) {
  return parse_safetensors_from(detail::read_file(path), "safetensors file '" + path + "'");
}

std::vector<std::byte> serialize_safetensors(const std::vector<std::pair<std::string, TensorView>>& tensors) {
  std::set<std::string_view> names;
  std::string header = "{";
  int64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const std::string what = "serialize_safetensors: tensor '" + detail::printable(name) + "'";
    SAPATTN_CHECK(!name.empty(), InvalidArgumentError, "serialize_safetensors: tensor names must be non-empty");
    SAPATTN_CHECK(name != kMetadataKey, InvalidArgumentError, what, ": the name is reserved for metadata");
    SAPATTN_CHECK(detail::is_valid_utf8(name), InvalidArgumentError, what,
                  ": the name is not valid UTF-8, which the JSON header requires");
    SAPATTN_CHECK(names.insert(name).second, InvalidArgumentError, what, ": the name appears twice");
    const std::optional<std::string_view> dtype = dtype_to_name(t.dtype);
    SAPATTN_CHECK(dtype.has_value(), DTypeError, what, ": dtype ", dtype_name(t.dtype),
                  " is not supported (f32, f16 and bf16 are written)");
    detail::check_serializable(t, what);
    const int64_t bytes =
        *detail::checked_byte_size(std::span(t.shape.data(), static_cast<size_t>(t.rank)), dtype_size(t.dtype));
    SAPATTN_CHECK(bytes <= std::numeric_limits<int64_t>::max() - offset, ShapeError,
                  "serialize_safetensors: the tensors hold more bytes than fit in int64");
    if (header.size() > 1) header += ',';
    header += detail::json_quote(name) + ":{\"dtype\":\"" + std::string(*dtype) +
              "\",\"shape\":" + detail::shape_string(std::span(t.shape.data(), static_cast<size_t>(t.rank))) +
              ",\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + bytes) + "]}";
    offset += bytes;
  }
  header += '}';
  // Spaces are JSON whitespace; padding to 8 keeps the data buffer 8-byte aligned in the file.
  header.append((8 - header.size() % 8) % 8, ' ');

  std::vector<std::byte> out;
  out.reserve(8 + header.size() + static_cast<size_t>(offset));
  for (int i = 0; i < 8; ++i) {
    out.push_back(static_cast<std::byte>(static_cast<uint64_t>(header.size()) >> (8 * i)));
  }
  const auto* h = reinterpret_cast<const std::byte*>(header.data());
  out.insert(out.end(), h, h + header.size());
  for (const auto& [name, t] : tensors) detail::append_row_major(t, out);
  return out;
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, TensorView>>& tensors) {
  detail::write_file(path, serialize_safetensors(tensors));
}

Tensor read_tensor(const std::string& path, const std::string& name) {
  if (has_extension(path, ".npy")) return read_npy(path);
  SAPATTN_CHECK(has_extension(path, ".safetensors"), FormatError, "cannot tell the format of '", path,
                "' from its extension: use .npy or .safetensors");
  std::map<std::string, Tensor> tensors = read_safetensors(path);
  const auto it = tensors.find(name);
  if (it != tensors.end()) return std::move(it->second);
  std::string available;
  size_t listed = 0;
  for (const auto& [n, t] : tensors) {
    if (listed == 10) {
      available += ", ...";
      break;
    }
    available += (listed++ ? ", '" : "'") + detail::printable(n) + "'";
  }
  SAPATTN_THROW(FormatError, "safetensors file '", path, "' has no tensor '", detail::printable(name), "' (it holds ",
                tensors.size(), tensors.size() == 1 ? " tensor" : " tensors", tensors.empty() ? "" : ": ", available,
                ")");
}

}  // namespace sapattn::io
