#include "progress.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace sapattn::cli {

Progress::Progress(std::string label, bool enabled, bool log_every_step)
    : label_(std::move(label)),
      enabled_(enabled),
      tty_(isatty(STDERR_FILENO) != 0),
      log_every_step_(log_every_step),
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

void Progress::update(int64_t done, int64_t total, double work_done) {
  if (!enabled_) return;
  std::lock_guard<std::mutex> lock(mutex_);
  done_ = done;
  total_ = total;
  work_done_ = work_done >= 0.0 ? std::min(work_done, 1.0) : (total > 0 ? static_cast<double>(done) / total : 0.0);
  if (tty_ || total <= 0) return;
  if (log_every_step_) {
    if (done < total) draw(false);
    return;
  }
  const int quarter = static_cast<int>(4 * done / total);
  const bool slow = std::chrono::steady_clock::now() - start_ > std::chrono::milliseconds(500);
  if (quarter > last_quarter_ && quarter < 4 && slow) {
    last_quarter_ = quarter;
    draw(false);
  }
}

void Progress::set_step(std::string step) {
  std::lock_guard<std::mutex> lock(mutex_);
  step_ = std::move(step);
}

void Progress::draw(bool final_line) {
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (final_line && !drawn_ && secs < 1.0 && !log_every_step_) return;
  drawn_ = true;
  // On a terminal the line is redrawn in place; \033[K clears what a longer line left behind.
  const char* begin = tty_ ? "\r" : "";
  const char* end = (tty_ && !final_line) ? "\033[K" : (tty_ ? "\033[K\n" : "\n");
  const std::string label = final_line || step_.empty() ? label_ : label_ + ": " + step_;
  if (total_ <= 0) {
    std::fprintf(stderr, "%s%-28s %s %6.1f s%s", begin, label.c_str(), final_line ? "done" : "... ", secs, end);
  } else {
    char bar[21];
    const int filled = static_cast<int>(20 * (final_line ? 1.0 : work_done_));
    for (int i = 0; i < 20; ++i) bar[i] = i < filled ? '#' : '.';
    bar[20] = '\0';
    char left[48] = "";
    // The estimate needs a finished share to extrapolate from.
    if (!final_line && work_done_ > 0.0 && work_done_ < 1.0)
      std::snprintf(left, sizeof left, ", about %.0f s left", std::ceil(secs * (1.0 - work_done_) / work_done_));
    std::fprintf(stderr, "%s%-28s [%s] %lld/%lld %6.1f s%s%s", begin, label.c_str(), bar,
                 static_cast<long long>(final_line ? total_ : done_), static_cast<long long>(total_), secs, left, end);
  }
  std::fflush(stderr);
}

void Progress::finish() {
  stop_.store(true);
  if (ticker_.joinable()) ticker_.join();
  std::lock_guard<std::mutex> lock(mutex_);
  if (finished_ || !enabled_) return;
  finished_ = true;
  draw(true);
}

}  // namespace sapattn::cli
