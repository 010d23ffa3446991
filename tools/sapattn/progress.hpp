// Progress on stderr for work that may take more than a couple of seconds. On a terminal the line
// is redrawn in place; otherwise (logs, CI) a line is printed at each quarter and at the end, or
// after every step when asked (log_every_step). Steps that finish within a second print nothing.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

namespace sapattn::cli {

class Progress {
 public:
  explicit Progress(std::string label, bool enabled = true, bool log_every_step = false);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Known amount of work: "label: step [#####.....] 3/7  12.3 s, about 20 s left". work_done in
  // [0, 1] is the share of the expected time that the finished steps stand for (default
  // done / total, steps of equal cost); the time left is elapsed * (1 - work_done) / work_done.
  void update(int64_t done, int64_t total, double work_done = -1.0);
  // What runs now, shown after the label.
  void set_step(std::string step);
  // Prints the final line (elapsed time); called by the destructor if not before.
  void finish();

 private:
  void draw(bool final_line);
  void tick_loop();

  std::string label_, step_;
  bool enabled_, tty_, log_every_step_;
  std::chrono::steady_clock::time_point start_;
  std::mutex mutex_;
  int64_t done_ = 0, total_ = 0;
  double work_done_ = 0.0;
  int last_quarter_ = -1;
  bool drawn_ = false;  // a step that ends in under a second without having drawn stays silent
  bool finished_ = false;
  std::atomic<bool> stop_{false};
  std::thread ticker_;  // redraws the elapsed time while a step with no counts runs
};

}  // namespace sapattn::cli
