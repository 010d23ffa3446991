#include "io/json.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <system_error>
#include <unordered_set>

#include "sapattn/error.hpp"

namespace sapattn::io::detail {
namespace {

// Length of the well-formed UTF-8 sequence at the start of `s`, or 0 if it is malformed
// (overlong forms, surrogates and code points above U+10FFFF are malformed, as RFC 3629 says).
size_t utf8_sequence_length(std::string_view s) {
  if (s.empty()) return 0;
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  const auto continuation = [&](size_t i) { return i < s.size() && (byte(i) & 0xc0u) == 0x80u; };
  const unsigned char c = byte(0);
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) return continuation(1) ? 2 : 0;
  if (c >= 0xe0 && c <= 0xef) {
    if (!continuation(1) || !continuation(2)) return 0;
    if (c == 0xe0 && byte(1) < 0xa0) return 0;  // overlong
    if (c == 0xed && byte(1) > 0x9f) return 0;  // UTF-16 surrogate
    return 3;
  }
  if (c >= 0xf0 && c <= 0xf4) {
    if (!continuation(1) || !continuation(2) || !continuation(3)) return 0;
    if (c == 0xf0 && byte(1) < 0x90) return 0;  // overlong
    if (c == 0xf4 && byte(1) > 0x8f) return 0;  // above U+10FFFF
    return 4;
  }
  return 0;
}

void append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

std::string hex_byte(unsigned char c) {
  static constexpr char kDigits[] = "0123456789abcdef";
  return {'\\', 'x', kDigits[c >> 4], kDigits[c & 0xf]};
}

// Recursive-descent parser over RFC 8259 JSON, restricted to integer numbers unless told otherwise.
class JsonParser {
 public:
  JsonParser(std::string_view text, std::string_view context, JsonNumbers numbers)
      : text_(text), context_(context), numbers_(numbers) {}

  JsonValue parse_document() {
    skip_whitespace();
    JsonValue v = parse_value(1);
    skip_whitespace();
    if (pos_ != text_.size()) fail("unexpected ", describe_next(), " after the JSON value");
    return v;
  }

 private:
  template <typename... Args>
  [[noreturn]] void fail_at(size_t at, const Args&... args) const {
    SAPATTN_THROW(FormatError, context_, ": invalid JSON: ", args..., " (at byte ", at, ")");
  }
  template <typename... Args>
  [[noreturn]] void fail(const Args&... args) const {
    fail_at(pos_, args...);
  }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return text_[pos_]; }

  std::string describe_next() const {
    if (at_end()) return "end of text";
    const size_t n = std::max<size_t>(1, utf8_sequence_length(text_.substr(pos_)));
    return ::sapattn::detail::concat("'", printable(text_.substr(pos_, n)), "'");
  }

  void skip_whitespace() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }

  void expect(char c) {
    if (at_end() || peek() != c) fail("expected '", c, "' but found ", describe_next());
    ++pos_;
  }

  JsonValue parse_value(int depth) {
    if (depth > kJsonMaxDepth) fail("nested deeper than ", kJsonMaxDepth, " levels");
    if (at_end()) fail("unexpected end of text where a value was expected");
    const char c = peek();
    if (c == '{') return parse_object(depth);
    if (c == '[') return parse_array(depth);
    if (c == '"') {
      JsonValue v;
      v.kind = JsonValue::Kind::kString;
      v.offset = pos_;
      v.string = parse_string();
      return v;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
    if (c == 't' || c == 'f' || c == 'n') return parse_literal();
    fail("unexpected ", describe_next(), " where a value was expected");
  }

  JsonValue parse_object(int depth) {
    JsonValue v;
    v.kind = JsonValue::Kind::kObject;
    v.offset = pos_;
    expect('{');
    skip_whitespace();
    if (!at_end() && peek() == '}') {
      ++pos_;
      return v;
    }
    std::unordered_set<std::string> keys;
    while (true) {
      skip_whitespace();
      if (at_end() || peek() != '"') fail("expected a string key but found ", describe_next());
      const size_t key_at = pos_;
      std::string key = parse_string();
      if (!keys.insert(key).second) fail_at(key_at, "duplicate key \"", printable(key), "\"");
      skip_whitespace();
      expect(':');
      skip_whitespace();
      v.object.push_back({std::move(key), parse_value(depth + 1)});
      skip_whitespace();
      if (at_end()) fail("unterminated object starting at byte ", v.offset);
      if (peek() == '}') break;
      if (peek() != ',') fail("expected ',' or '}' in an object but found ", describe_next());
      ++pos_;
    }
    ++pos_;
    return v;
  }

  JsonValue parse_array(int depth) {
    JsonValue v;
    v.kind = JsonValue::Kind::kArray;
    v.offset = pos_;
    expect('[');
    skip_whitespace();
    if (!at_end() && peek() == ']') {
      ++pos_;
      return v;
    }
    while (true) {
      skip_whitespace();
      v.array.push_back(parse_value(depth + 1));
      skip_whitespace();
      if (at_end()) fail("unterminated array starting at byte ", v.offset);
      if (peek() == ']') break;
      if (peek() != ',') fail("expected ',' or ']' in an array but found ", describe_next());
      ++pos_;
    }
    ++pos_;
    return v;
  }

  uint32_t parse_hex4() {
    if (text_.size() - pos_ < 4) fail("truncated \\u escape");
    uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = text_[pos_ + i];
      const size_t digit =
          std::string_view("0123456789abcdef").find(static_cast<char>(std::tolower(static_cast<unsigned char>(h))));
      if (digit == std::string_view::npos) {
        fail("\\u escape needs 4 hex digits, found '", printable(text_.substr(pos_, 4)), "'");
      }
      cp = cp * 16 + static_cast<uint32_t>(digit);
    }
    pos_ += 4;
    return cp;
  }

  // The code point of a \u escape whose "\u" has been consumed; joins a surrogate pair.
  uint32_t parse_unicode_escape(size_t escape_at) {
    const uint32_t cp = parse_hex4();
    const std::string_view high = text_.substr(escape_at, 6);
    if (cp >= 0xdc00 && cp <= 0xdfff) fail_at(escape_at, "unpaired low surrogate ", high);
    if (cp < 0xd800 || cp > 0xdbff) return cp;
    if (text_.substr(pos_, 2) != "\\u") fail_at(escape_at, "high surrogate ", high, " without a low one");
    pos_ += 2;
    const uint32_t low = parse_hex4();
    if (low < 0xdc00 || low > 0xdfff) {
      fail_at(escape_at, "high surrogate ", high, " followed by ", text_.substr(pos_ - 6, 6),
              " instead of a low surrogate");
    }
    return 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
  }

  std::string parse_string() {
    const size_t start = pos_;
    expect('"');
    std::string out;
    while (true) {
      if (at_end()) fail_at(start, "unterminated string");
      const auto c = static_cast<unsigned char>(peek());
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("raw control byte ", hex_byte(c), " in a string (JSON needs it escaped)");
      if (c == '\\') {
        const size_t escape_at = pos_;
        ++pos_;
        if (at_end()) fail_at(start, "unterminated string");
        const char e = peek();
        ++pos_;
        switch (e) {
          case '"':
            out += '"';
            break;
          case '\\':
            out += '\\';
            break;
          case '/':
            out += '/';
            break;
          case 'b':
            out += '\b';
            break;
          case 'f':
            out += '\f';
            break;
          case 'n':
            out += '\n';
            break;
          case 'r':
            out += '\r';
            break;
          case 't':
            out += '\t';
            break;
          case 'u':
            append_utf8(parse_unicode_escape(escape_at), out);
            break;
          default:
            fail_at(escape_at, "invalid escape '\\", printable(text_.substr(escape_at + 1, 1)),
                    "' (valid: \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)");
        }
        continue;
      }
      const size_t n = utf8_sequence_length(text_.substr(pos_));
      if (n == 0) fail("invalid UTF-8 byte ", hex_byte(c), " in a string");
      out.append(text_.substr(pos_, n));
      pos_ += n;
    }
  }

  JsonValue parse_number() {
    JsonValue v;
    v.kind = JsonValue::Kind::kInt;
    v.offset = pos_;
    const bool negative = peek() == '-';
    if (negative) ++pos_;
    const auto is_digit = [&] { return !at_end() && peek() >= '0' && peek() <= '9'; };
    if (!is_digit()) fail("'-' must be followed by digits");
    const size_t digits_at = pos_;
    while (is_digit()) ++pos_;
    const std::string_view digits = text_.substr(digits_at, pos_ - digits_at);
    if (digits.size() > 1 && digits[0] == '0') fail_at(v.offset, "number with a leading zero");
    if (!at_end() && (peek() == '.' || peek() == 'e' || peek() == 'E')) {
      if (numbers_ == JsonNumbers::kAny) return parse_fraction(std::move(v));
      // Consume the fraction or exponent only to name the whole number in the message.
      constexpr std::string_view kNumberChars = "0123456789.eE+-";
      while (!at_end() && kNumberChars.find(peek()) != std::string_view::npos) ++pos_;
      fail_at(v.offset, "number ", printable(text_.substr(v.offset, pos_ - v.offset)),
              " is not an integer (only integers are accepted)");
    }
    // Accumulate negatively so that INT64_MIN is representable.
    int64_t value = 0;
    constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
    for (const char d : digits) {
      const int digit = d - '0';
      if (value < (kMin + digit) / 10) fail_at(v.offset, "integer ", digits, " does not fit in 64 bits");
      value = value * 10 - digit;
    }
    if (!negative) {
      if (value == kMin) fail_at(v.offset, "integer ", digits, " does not fit in 64 bits");
      value = -value;
    }
    v.integer = value;
    return v;
  }

  // The rest of a number whose integer part is read: ['.' digits] [('e' | 'E') ['+' | '-'] digits].
  JsonValue parse_fraction(JsonValue v) {
    const auto digits = [&](const char* where) {
      if (at_end() || peek() < '0' || peek() > '9') fail("expected a digit ", where, " but found ", describe_next());
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
    };
    if (peek() == '.') {
      ++pos_;
      digits("after the decimal point");
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      digits("in the exponent");
    }
    const std::string literal(text_.substr(v.offset, pos_ - v.offset));
    errno = 0;
    v.number = std::strtod(literal.c_str(), nullptr);
    if (errno == ERANGE && std::abs(v.number) > 1.0) fail_at(v.offset, "number ", literal, " is out of range");
    v.kind = JsonValue::Kind::kNumber;
    return v;
  }

  JsonValue parse_literal() {
    JsonValue v;
    v.offset = pos_;
    const std::string_view rest = text_.substr(pos_);
    if (rest.starts_with("true")) {
      v.kind = JsonValue::Kind::kBool;
      v.boolean = true;
      pos_ += 4;
    } else if (rest.starts_with("false")) {
      v.kind = JsonValue::Kind::kBool;
      pos_ += 5;
    } else if (rest.starts_with("null")) {
      pos_ += 4;
    } else {
      fail("unexpected ", describe_next(), " where a value was expected");
    }
    return v;
  }

  std::string_view text_;
  std::string_view context_;
  JsonNumbers numbers_;
  size_t pos_ = 0;
};

}  // namespace

const JsonValue* JsonValue::find(std::string_view key) const {
  for (const Member& m : object) {
    if (m.key == key) return &m.value;
  }
  return nullptr;
}

JsonValue parse_json(std::string_view text, std::string_view context, JsonNumbers numbers) {
  return JsonParser(text, context, numbers).parse_document();
}

std::string_view json_kind_name(JsonValue::Kind kind) {
  switch (kind) {
    case JsonValue::Kind::kNull:
      return "null";
    case JsonValue::Kind::kBool:
      return "a boolean";
    case JsonValue::Kind::kInt:
      return "an integer";
    case JsonValue::Kind::kNumber:
      return "a number";
    case JsonValue::Kind::kString:
      return "a string";
    case JsonValue::Kind::kArray:
      return "an array";
    case JsonValue::Kind::kObject:
      return "an object";
  }
  return "?";
}

std::string json_quote(std::string_view s) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      out += "\\u00";
      out += kDigits[c >> 4];
      out += kDigits[c & 0xf];
    } else {
      out += ch;
    }
  }
  out += '"';
  return out;
}

bool is_valid_utf8(std::string_view s) {
  while (!s.empty()) {
    const size_t n = utf8_sequence_length(s);
    if (n == 0) return false;
    s.remove_prefix(n);
  }
  return true;
}

std::string printable(std::string_view s, size_t max_bytes) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    if (out.size() >= max_bytes) {
      out += "...";
      break;
    }
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = utf8_sequence_length(s.substr(i));
    if (c < 0x20 || c == 0x7f || n == 0) {
      out += hex_byte(c);
      ++i;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  return out;
}

}  // namespace sapattn::io::detail
