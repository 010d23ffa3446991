// A strict JSON reader and string quoting for safetensors headers, plus message-safe printing of
// untrusted text (internal, not part of the API). Everything that parses untrusted bytes throws
// FormatError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "sapattn/tensor.hpp"

namespace sapattn::io::detail {

// A parsed JSON value. Numbers are integers (kInt) unless the parse allows fractions: a
// safetensors header holds nothing else (shapes and offsets), so there a fraction or exponent is
// rejected while parsing instead of being carried as a double that could silently lose precision.
struct JsonValue {
  enum class Kind { kNull, kBool, kInt, kNumber, kString, kArray, kObject };
  struct Member;

  Kind kind = Kind::kNull;
  bool boolean = false;
  int64_t integer = 0;
  double number = 0.0;  // kNumber: a number with a fraction or an exponent
  std::string string;
  std::vector<JsonValue> array;
  std::vector<Member> object;  // in text order; keys are unique (duplicates are a parse error)
  size_t offset = 0;           // byte offset of the value in the parsed text, for messages

  // The member named `key`, or nullptr (objects only).
  const JsonValue* find(std::string_view key) const;
};

struct JsonValue::Member {
  std::string key;
  JsonValue value;
};

// Nesting deeper than this is rejected, so hostile input cannot exhaust the stack.
inline constexpr int kJsonMaxDepth = 64;

// Which numbers a parse accepts: integers alone (kInt), or also fractions and exponents (kNumber).
enum class JsonNumbers { kIntegers, kAny };

// Parses `text` as exactly one JSON value, optionally surrounded by whitespace. Strings must be
// valid UTF-8; escapes (including \uXXXX surrogate pairs) are decoded. Throws FormatError whose
// message starts with `context` and names the problem and its byte offset in `text`.
JsonValue parse_json(std::string_view text, std::string_view context, JsonNumbers numbers = JsonNumbers::kIntegers);

// "an object", "an array", "null", ... for messages.
std::string_view json_kind_name(JsonValue::Kind kind);

// `s` as a JSON string literal, quotes included. `s` must be valid UTF-8 (checked by the caller).
std::string json_quote(std::string_view s);

bool is_valid_utf8(std::string_view s);

// `s` made safe to print inside a message: control bytes and invalid UTF-8 become \xNN, and text
// beyond `max_bytes` is cut with "...". Keeps a hostile name from garbling a terminal or a log.
std::string printable(std::string_view s, size_t max_bytes = 80);

}  // namespace sapattn::io::detail
