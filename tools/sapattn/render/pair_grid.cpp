#include "render/pair_grid.hpp"

#include <algorithm>

#include "sapattn/error.hpp"

namespace sapattn::render {

PairGrid kept_pair_grid(std::int64_t tokens, const std::int32_t* q_labels, const std::int32_t* k_labels,
                        const std::uint8_t* mask, std::int64_t k_clusters, const std::int64_t* q_position,
                        const std::int64_t* k_position, std::int64_t tokens_per_cell) {
  SAPATTN_CHECK(tokens >= 1 && k_clusters >= 1 && tokens_per_cell >= 1, InvalidArgumentError,
                "kept_pair_grid: need tokens, key clusters and tokens per cell >= 1, got ", tokens, ", ", k_clusters,
                ", ", tokens_per_cell);
  PairGrid grid;
  grid.cells = (tokens + tokens_per_cell - 1) / tokens_per_cell;
  const auto cells = static_cast<std::size_t>(grid.cells);
  // Kept pairs per cell, counted a query row at a time: the keys' cells and labels are read once.
  std::vector<std::int64_t> kept(cells * cells, 0);
  std::vector<std::int64_t> key_cell(static_cast<std::size_t>(tokens));
  for (std::int64_t j = 0; j < tokens; ++j) key_cell[j] = k_position[j] / tokens_per_cell;
  for (std::int64_t i = 0; i < tokens; ++i) {
    const std::uint8_t* row = mask + static_cast<std::int64_t>(q_labels[i]) * k_clusters;
    std::int64_t* out = kept.data() + (q_position[i] / tokens_per_cell) * grid.cells;
    for (std::int64_t j = 0; j < tokens; ++j) out[key_cell[j]] += row[k_labels[j]] != 0;
  }
  const auto held = [&](std::int64_t cell) { return std::min(tokens_per_cell, tokens - cell * tokens_per_cell); };
  grid.share.resize(cells * cells);
  for (std::int64_t a = 0; a < grid.cells; ++a)
    for (std::int64_t b = 0; b < grid.cells; ++b)
      grid.share[a * grid.cells + b] =
          static_cast<float>(static_cast<double>(kept[a * grid.cells + b]) / static_cast<double>(held(a) * held(b)));
  return grid;
}

}  // namespace sapattn::render
