// The fused descent of one query row: stream each candidate child's key once, score it against
// all probes, and keep a running top-t in the output row. No score matrix is materialised.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/probe_reduce.h"
#include "../common/top_t.h"
#include "simd.h"

namespace mllm::cpu {

// One level as the row kernel sees it: raw pointers, sizes, and the row's output.
template <typename key_t, typename acc_t>
struct LevelView {
  const acc_t* probes;  // [B, P, D], converted to acc_t
  const key_t* keys;    // [N, D]
  const bool* mask;     // [N] or nullptr
  int64_t num_probes;
  int64_t dim;
  int64_t num_nodes;
  bool lse;
};

// Selects the top `t` children of the `num_parents` ids in `parents` for query `b`; -1 parents
// are empty. With `skip_repeated`, a parent id repeated in the row is skipped so that each child
// counts once (callers whose parents are unique by construction pass false).
template <typename key_t, typename acc_t>
void descend_row(const LevelView<key_t, acc_t>& level, int64_t b, const int64_t* parents, int64_t num_parents,
                 int64_t fanout, bool skip_repeated, int64_t t, acc_t* out_scores, int64_t* out_ids,
                 std::vector<acc_t>& dots) {
  const acc_t* probes = level.probes + b * level.num_probes * level.dim;
  const int64_t row_bytes = level.dim * int64_t(sizeof(key_t));
  RunningTopT<acc_t> top(out_scores, out_ids, t);
  dots.resize(level.num_probes);
  for (int64_t j = 0; j < num_parents; ++j) {
    const int64_t parent = parents[j];
    if (parent < 0) continue;
    bool repeated = false;
    for (int64_t k = 0; skip_repeated && k < j && !repeated; ++k) repeated = parents[k] == parent;
    if (repeated) continue;
    // Software prefetch keeps enough rows in flight to approach memory bandwidth: the next
    // parent's first rows while this block is scored, and kPrefetchRows ahead inside it.
    if (j + 1 < num_parents && parents[j + 1] >= 0)
      prefetch_row(level.keys + parents[j + 1] * fanout * level.dim, kPrefetchRows * row_bytes);
    const int64_t first = parent * fanout;
    const int64_t last = first + std::min(fanout, level.num_nodes - first);
    for (int64_t child = first; child < last; ++child) {
      if (child + kPrefetchRows < last) prefetch_row(level.keys + (child + kPrefetchRows) * level.dim, row_bytes);
      if (level.mask != nullptr && !level.mask[child]) continue;
      multi_dot(probes, level.num_probes, level.dim, level.keys + child * level.dim, dots.data());
      top.push(reduce_probes(dots.data(), level.num_probes, level.lse), child);
    }
  }
  top.finish();
}

}  // namespace mllm::cpu
