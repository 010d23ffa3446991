#include "cli_args.hpp"

#include <charconv>
#include <cmath>
#include <iostream>
#include <sstream>

namespace sapattn::cli {

Args::Args(std::string command, std::string summary, std::vector<Option> options)
    : command_(std::move(command)), summary_(std::move(summary)), options_(std::move(options)) {}

const Option* Args::find(const std::string& name) const {
  for (const Option& o : options_)
    if (o.name == name) return &o;
  return nullptr;
}

bool Args::parse(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    std::string word = argv[i];
    if (word == "--help" || word == "-h") {
      std::cout << help();
      return false;
    }
    SAPATTN_CHECK(word.rfind("--", 0) == 0 && word.size() > 2, UsageError, "unexpected argument '", word,
                  "' (see sapattn ", command_, " --help)");
    std::string name = word.substr(2), value;
    const size_t eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    const Option* opt = find(name);
    SAPATTN_CHECK(opt != nullptr, UsageError, "unknown option --", name, " (see sapattn ", command_, " --help)");
    SAPATTN_CHECK(!values_.count(name), UsageError, "--", name, " given twice");
    if (opt->value_name.empty()) {
      SAPATTN_CHECK(!inline_value, UsageError, "--", name, " takes no value");
    } else if (!inline_value) {
      SAPATTN_CHECK(i + 1 < argc, UsageError, "--", name, " needs a value (", opt->value_name, ")");
      value = argv[++i];
    }
    values_[name] = value;
  }
  return true;
}

std::string Args::help() const {
  std::ostringstream os;
  os << "usage: sapattn " << command_ << " [options]\n\n" << summary_ << "\n\noptions:\n";
  for (const Option& o : options_) {
    std::string left = "  --" + o.name + (o.value_name.empty() ? "" : " " + o.value_name);
    if (left.size() < 28) left.resize(28, ' ');
    os << left << " " << o.help;
    if (!o.default_text.empty()) os << " (default: " << o.default_text << ")";
    os << "\n";
  }
  os << "  --help                       this text\n";
  return os.str();
}

bool Args::has(const std::string& name) const { return values_.count(name) != 0; }

std::string Args::get(const std::string& name, const std::string& fallback) const {
  const auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

std::string Args::require(const std::string& name) const {
  SAPATTN_CHECK(has(name), UsageError, "--", name, " is required (see sapattn ", command_, " --help)");
  return values_.at(name);
}

int64_t Args::get_int(const std::string& name, int64_t fallback, int64_t lo, int64_t hi) const {
  if (!has(name)) return fallback;
  const std::string& s = values_.at(name);
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  SAPATTN_CHECK(ec == std::errc() && end == s.data() + s.size(), UsageError, "--", name, " needs an integer, got '", s,
                "'");
  SAPATTN_CHECK(v >= lo && v <= hi, UsageError, "--", name, " must be in [", lo, ", ", hi, "], got ", v);
  return v;
}

double Args::get_double(const std::string& name, double fallback, double lo, double hi) const {
  return has(name) ? number(name, values_.at(name), lo, hi) : fallback;
}

double Args::number(const std::string& name, const std::string& s, double lo, double hi) const {
  double v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  SAPATTN_CHECK(ec == std::errc() && end == s.data() + s.size() && std::isfinite(v), UsageError, "--", name,
                " needs a number, got '", s, "'");
  SAPATTN_CHECK(v >= lo && v <= hi, UsageError, "--", name, " must be in [", lo, ", ", hi, "], got ", v);
  return v;
}

std::string Args::get_choice(const std::string& name, const std::string& fallback,
                             const std::vector<std::string>& choices) const {
  return choice(name, get(name, fallback), choices);
}

std::string Args::choice(const std::string& name, const std::string& v, const std::vector<std::string>& choices) const {
  for (const std::string& c : choices)
    if (v == c) return v;
  std::string list;
  for (const std::string& c : choices) list += (list.empty() ? "" : ", ") + c;
  SAPATTN_THROW(UsageError, "--", name, " must be one of ", list, ", got '", v, "'");
}

namespace {
std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> parts;
  size_t begin = 0;
  for (size_t comma; (comma = s.find(',', begin)) != std::string::npos; begin = comma + 1)
    parts.push_back(s.substr(begin, comma - begin));
  parts.push_back(s.substr(begin));
  return parts;
}
}  // namespace

std::vector<double> Args::get_doubles(const std::string& name, double fallback, double lo, double hi) const {
  if (!has(name)) return {fallback};
  std::vector<double> values;
  for (const std::string& part : split_commas(values_.at(name))) values.push_back(number(name, part, lo, hi));
  return values;
}

std::vector<std::string> Args::get_choices(const std::string& name, const std::string& fallback,
                                           const std::vector<std::string>& choices) const {
  std::vector<std::string> values;
  for (const std::string& part : split_commas(get(name, fallback))) values.push_back(choice(name, part, choices));
  return values;
}

}  // namespace sapattn::cli
