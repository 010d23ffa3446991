// A small command-line parser: declared options only, typed getters with range checks. Every
// problem throws UsageError, which main() turns into one line, "sapattn <command>: error: <message>",
// and exit code 2; so messages carry no prefix of their own.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "sapattn/error.hpp"

namespace sapattn {
// Bad command-line usage (lives beside the library's errors so SAPATTN_CHECK can raise it).
class UsageError : public InvalidArgumentError {
  using InvalidArgumentError::InvalidArgumentError;
};
}  // namespace sapattn

namespace sapattn::cli {

struct Option {
  std::string name;        // without the leading "--"
  std::string value_name;  // empty: a flag that takes no value
  std::string help;
  std::string default_text;  // shown in --help
};

class Args {
 public:
  Args(std::string command, std::string summary, std::vector<Option> options);

  // Parses argv (after the command word). Returns false when --help was asked for (help printed).
  bool parse(int argc, char** argv);
  std::string help() const;

  bool has(const std::string& name) const;
  bool flag(const std::string& name) const { return has(name); }
  std::string get(const std::string& name, const std::string& fallback) const;
  std::string require(const std::string& name) const;
  int64_t get_int(const std::string& name, int64_t fallback, int64_t lo, int64_t hi) const;
  double get_double(const std::string& name, double fallback, double lo, double hi) const;
  // One of `choices`, else UsageError listing them.
  std::string get_choice(const std::string& name, const std::string& fallback,
                         const std::vector<std::string>& choices) const;
  // Comma-separated lists ("0.8,0.9"), each entry checked as get_double / get_choice check one.
  std::vector<double> get_doubles(const std::string& name, double fallback, double lo, double hi) const;
  std::vector<std::string> get_choices(const std::string& name, const std::string& fallback,
                                       const std::vector<std::string>& choices) const;

 private:
  const Option* find(const std::string& name) const;
  double number(const std::string& name, const std::string& text, double lo, double hi) const;
  std::string choice(const std::string& name, const std::string& text, const std::vector<std::string>& choices) const;
  std::string command_, summary_;
  std::vector<Option> options_;
  std::map<std::string, std::string> values_;
};

}  // namespace sapattn::cli
