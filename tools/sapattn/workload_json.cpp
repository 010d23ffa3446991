#include "workload_json.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "commands.hpp"
#include "io/json.hpp"

namespace sapattn::cli {

std::string workload_json(const workload::Workload& w, uint64_t seed, const std::string& dtype, double top13_mass) {
  const workload::Preset& p = w.preset;
  std::string kinds;
  for (workload::HeadKind k : w.head_kinds)
    kinds += (kinds.empty() ? "" : ", ") + io::detail::json_quote(std::string(workload::head_kind_name(k)));
  const auto& s = w.q.shape();
  std::ostringstream os;
  os << "{\n  \"preset\": " << io::detail::json_quote(p.name) << ",\n  \"seed\": " << seed
     << ",\n  \"dtype\": " << io::detail::json_quote(dtype) << ",\n  \"layout\": \"bhsd\",\n  \"shape\": [" << s[0]
     << ", " << s[1] << ", " << s[2] << ", " << s[3] << "],\n  \"grid\": [" << p.frames << ", " << p.height << ", "
     << p.width << "],\n  \"text_tokens\": " << p.text_tokens << ",\n  \"prompt_length\": " << p.prompt_length
     << ",\n  \"head_kinds\": [" << kinds << "],\n  \"top13_mass\": " << json_number(top13_mass) << "\n}\n";
  return os.str();
}

std::optional<WorkloadJson> read_workload_json_beside(const std::string& tensor_path) {
  namespace fs = std::filesystem;
  const fs::path path = fs::path(tensor_path).parent_path() / "workload.json";
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return std::nullopt;
  std::ifstream f(path, std::ios::binary);
  std::stringstream text;
  text << f.rdbuf();
  SAPATTN_CHECK(f.good() || f.eof(), IoError, "cannot read ", path.string());
  using Kind = io::detail::JsonValue::Kind;
  const io::detail::JsonValue root = io::detail::parse_json(text.str(), path.string(), io::detail::JsonNumbers::kAny);
  const auto field = [&](const char* key, Kind kind) -> const io::detail::JsonValue& {
    const io::detail::JsonValue* v = root.kind == Kind::kObject ? root.find(key) : nullptr;
    SAPATTN_CHECK(v != nullptr && v->kind == kind, FormatError, path.string(), ": expected \"", key, "\" as ",
                  io::detail::json_kind_name(kind), " (a workload description written by sapattn gen)");
    return *v;
  };
  WorkloadJson w;
  w.path = path.string();
  w.layout = field("layout", Kind::kString).string;
  SAPATTN_CHECK(w.layout == "bhsd" || w.layout == "bshd", FormatError, path.string(),
                ": \"layout\" must be \"bhsd\" or \"bshd\", got ", io::detail::json_quote(w.layout));
  for (const io::detail::JsonValue& extent : field("shape", Kind::kArray).array) {
    SAPATTN_CHECK(extent.kind == Kind::kInt, FormatError, path.string(), ": \"shape\" must hold integers");
    w.shape.push_back(extent.integer);
  }
  w.text_tokens = field("text_tokens", Kind::kInt).integer;
  w.prompt_length = field("prompt_length", Kind::kInt).integer;
  SAPATTN_CHECK(w.shape.size() == 4 && w.text_tokens >= 0 && w.prompt_length >= 0 && w.prompt_length <= w.text_tokens,
                FormatError, path.string(), ": needs a shape of 4 extents and 0 <= prompt_length <= text_tokens");
  return w;
}

}  // namespace sapattn::cli
