#include "progress.hpp"

#include <unistd.h>

#include <cstdio>

namespace sapattn::cli {

Progress::Progress(std::string label, bool enabled)
    : label_(std::move(label)),
      enabled_(enabled),
      tty_(isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()) {
  if (enabled_ && tty_) ticker_ = std::thread([this] { tick_loop(); });
}

Progress::~Progress() { finish(); }

void Progress::tick_loop() {
  // Redraw every 200 ms once the step has run for half a second, so short steps stay quiet.
  while (!stop_.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    if (stop_.load()) break;
    if (std::chrono::steady_clock::now() - start_ < std::chrono::milliseconds(500)) continue;
    std::lock_guard<std::mutex> lock(mutex_);
    draw(false);
  }
}

void Progress::update(int64_t done, int64_t total) {
  if (!enabled_) return;
  std::lock_guard<std::mutex> lock(mutex_);
  done_ = done;
  total_ = total;
  if (!tty_ && total > 0) {
    const int quarter = static_cast<int>(4 * done / total);
    const bool slow = std::chrono::steady_clock::now() - start_ > std::chrono::milliseconds(500);
    if (quarter > last_quarter_ && quarter < 4 && slow) {
      last_quarter_ = quarter;
      draw(false);
    }
  }
}

void Progress::draw(bool final_line) {
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (final_line && !drawn_ && secs < 1.0) return;
  drawn_ = true;
  char bar[24] = "";
  if (total_ > 0) {
    const int filled = static_cast<int>(20 * done_ / total_);
    for (int i = 0; i < 20; ++i) bar[i] = i < filled ? '#' : '.';
    bar[20] = '\0';
    std::fprintf(stderr, "%s%-28s [%s] %3d%% %6.1f s%s", tty_ ? "\r" : "", label_.c_str(), bar,
                 static_cast<int>(100 * done_ / total_), secs, (tty_ && !final_line) ? "" : "\n");
  } else {
    std::fprintf(stderr, "%s%-28s %s %6.1f s%s", tty_ ? "\r" : "", label_.c_str(), final_line ? "done" : "... ", secs,
                 (tty_ && !final_line) ? "" : "\n");
  }
  std::fflush(stderr);
}

void Progress::finish() {
  stop_.store(true);
  if (ticker_.joinable()) ticker_.join();
  std::lock_guard<std::mutex> lock(mutex_);
  if (finished_ || !enabled_) return;
  finished_ = true;
  if (total_ > 0) done_ = total_;
  draw(true);
}

}  // namespace sapattn::cli
