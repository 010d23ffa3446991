// The kept query-key pairs of a clustered block mask, binned onto a coarse grid for a picture
// (the demo's mask.png).
#pragma once

#include <cstdint>
#include <vector>

namespace sapattn::render {

struct PairGrid {
  std::int64_t cells = 0;    // the grid is cells x cells
  std::vector<float> share;  // cells * cells, row-major: the share of the cell's pairs that are kept
};

// One head's S x S mask of kept pairs, (i, j) kept when mask[q_labels[i] * k_clusters +
// k_labels[j]] != 0, binned by position: query i lies in grid row q_position[i] / tokens_per_cell,
// key j in grid column k_position[j] / tokens_per_cell (positions are a permutation of [0, S): the
// token order itself, or each token's rank in cluster order). Each cell holds the exact share of
// its pairs that are kept, the last row and column of cells over the tokens they hold: no cell
// weighs more because it covers more tokens than its neighbours, the aliasing that bins of a
// fractional number of tokens (12.8 for 5,120 tokens on 400 pixels) turn into moire. Throws
// InvalidArgumentError for a tokens_per_cell below 1 or an empty mask.
PairGrid kept_pair_grid(std::int64_t tokens, const std::int32_t* q_labels, const std::int32_t* k_labels,
                        const std::uint8_t* mask, std::int64_t k_clusters, const std::int64_t* q_position,
                        const std::int64_t* k_position, std::int64_t tokens_per_cell);

}  // namespace sapattn::render
