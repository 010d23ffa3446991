// sapattn: the command-line face of the engine. Exit codes: 0 success, 2 bad usage or bad input
// (one line on stderr naming the problem), 1 anything unexpected.
#include <cstring>
#include <iostream>
#include <new>

#include "commands.hpp"

namespace {

constexpr const char* kUsage =
    "usage: sapattn <command> [options]\n"
    "\n"
    "Sparse VideoGen2 (SVG2) attention: semantic-aware k-means permutation and top-p block selection.\n"
    "\n"
    "commands:\n"
    "  demo   generate a small video workload, compare dense, sap and blocks, write pictures\n"
    "  eval   run a method on your own Q, K, V (.npy or .safetensors) and measure it against dense\n"
    "  gen    write a synthetic video-attention workload (presets: tiny, tiny-text, wan-1.3b-480p,\n"
    "         wan-14b-720p, hunyuan-720p)\n"
    "\n"
    "Run 'sapattn <command> --help' for the options of each, 'sapattn --version' for the version.\n";

// SAPATTN_VERSION is the CMake project version (tools/sapattn/CMakeLists.txt), the one the Python
// package and the CMake package carry too.
#ifdef SAPATTN_HAS_CUDA
constexpr const char* kBackends = "CPU and CUDA backends";
#else
constexpr const char* kBackends = "CPU backend";
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
      std::strcmp(argv[1], "help") == 0) {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  if (std::strcmp(argv[1], "--version") == 0) {
    std::cout << "sapattn " << SAPATTN_VERSION << " (" << kBackends << ")\n";
    return 0;
  }
  const std::string command = argv[1];
  try {
    if (command == "demo") return sapattn::cli::run_demo(argc - 2, argv + 2);
    if (command == "eval") return sapattn::cli::run_eval(argc - 2, argv + 2);
    if (command == "gen") return sapattn::cli::run_gen(argc - 2, argv + 2);
    std::cerr << "sapattn: unknown command '" << command << "' (commands: demo, eval, gen; see sapattn --help)\n";
    return 2;
  } catch (const sapattn::Error& e) {
    // Every library error is about the input: the usage, a file, a shape, a value.
    std::cerr << "sapattn " << command << ": error: " << e.what() << "\n";
    return 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "sapattn " << command << ": error: out of memory (the input is too large for this machine)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "sapattn " << command << ": internal error: " << e.what() << "\n";
    return 1;
  }
}
