// The fused descent of several query rows together, for keys scored exactly (float keys, and int8
// keys that the int8 screen does not take): a parent that several of the rows selected is read
// (and its keys converted) once, and its children are scored against the probes of all those rows
// in one pass. Each row keeps its own running top t; the result is the one descend_row gives for
// each row (a dot product has the same bits in any tile, and the top t does not depend on the
// order of the candidates).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "descend_row.h"

namespace mllm::cpu {

// Per-thread scratch of descend_rows_shared, reused across calls.
template <typename acc_t>
struct SharedScratch {
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (parent, row) of every candidate block
  std::vector<int64_t> block_parents;              // the distinct parents, ascending (scan order)
  GroupedDotsScratch<acc_t> dots;                  // the scorer's; probe_rows: [rows of a block, P] probes
  std::vector<acc_t> bounds;                       // [rows of a block, P]: see refresh_bound
  std::vector<RunningTopT<acc_t>> tops;            // per row: its running top t
};

// Selects the top `t` children for the query rows first_row .. first_row + num_rows: row b's
// parents are parents_of(b)[0 .. num_parents) (-1 empty; a repeated one is skipped with
// `skip_repeated`), and its result goes to out_scores + b * t and out_ids + b * t.
template <typename key_t, typename acc_t, typename ParentsOf>
void descend_rows_shared(const LevelView<key_t, acc_t>& level, int64_t first_row, int64_t num_rows,
                         const ParentsOf& parents_of, int64_t num_parents, int64_t fanout, bool skip_repeated,
                         int64_t t, acc_t* out_scores, int64_t* out_ids, SharedScratch<acc_t>& scratch) {
  const int64_t num_probes = level.num_probes, dim = level.dim;
  const int64_t row_bytes = dim * int64_t(sizeof(key_t));
  // Group the rows by parent: sort the (parent, row) pairs once.
  auto& pairs = scratch.pairs;
  pairs.clear();
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t* parents = parents_of(first_row + r);
    for (int64_t j = 0; j < num_parents; ++j) {
      if (parents[j] >= 0 && !(skip_repeated && repeats_earlier(parents, j))) pairs.emplace_back(parents[j], r);
    }
  }
  std::sort(pairs.begin(), pairs.end());
  auto& block_parents = scratch.block_parents;
  block_parents.clear();
  for (size_t i = 0; i < pairs.size(); ++i)
    if (i == 0 || pairs[i].first != pairs[i - 1].first) block_parents.push_back(pairs[i].first);

  auto& tops = scratch.tops;
  tops.clear();
  for (int64_t r = 0; r < num_rows; ++r)
    tops.emplace_back(out_scores + (first_row + r) * t, out_ids + (first_row + r) * t, t);
  BlockPrefetcher prefetcher(level.keys, fanout * row_bytes, level.num_nodes * row_bytes, block_parents.data(),
                             static_cast<int64_t>(block_parents.size()));
  size_t begin = 0, end = 0;  // the pairs of the parent being scored
  // bounds[q, :] = the score a child's probe dot must reach for row pairs[begin + q] to take the
  // child: for "max", a child none of whose dots reach the row's t-th score cannot enter its full
  // top t (and a NaN dot reaches nothing: its score is NaN, never kept). -inf where that does
  // not hold (a top not yet full, "lse").
  auto& bounds = scratch.bounds;
  auto refresh_bound = [&](size_t q) {
    const RunningTopT<acc_t>& top = tops[pairs[begin + q].second];
    const acc_t bound = level.lse || top.size < top.capacity ? -std::numeric_limits<acc_t>::infinity()
                                                                : top.scores[top.capacity - 1];
    std::fill_n(bounds.data() + q * num_probes, num_probes, bound);
  };
  auto offer_to_rows = [&](int64_t child, acc_t* child_dots) {
    const int64_t dots = static_cast<int64_t>(end - begin) * num_probes;
    if constexpr (std::is_same_v<key_t, int8_t>) scale_dots(child_dots, dots, static_cast<acc_t>(level.scales[child]));
    // Most children reach no row's bound: the dots are compared with the bounds a vector at a
    // time, and only the rows with a dot at its bound or above are offered the child.
    int64_t last_offered = -1;
    for (int64_t i = 0; i < dots; i += kMaskBits) {
      for (uint32_t hits = at_least_mask(child_dots + i, bounds.data() + i, std::min(kMaskBits, dots - i));
           hits != 0; hits &= hits - 1) {
        const int64_t dot = i + __builtin_ctz(hits);
        const int64_t q = num_probes == 1 ? dot : dot / num_probes;
        if (q == last_offered) continue;  // through another of its probes
        last_offered = q;
        offer(tops[pairs[begin + q].second], reduce_probes(child_dots + q * num_probes, num_probes, level.lse), child);
        refresh_bound(q);
      }
    }
  };
  GroupedDots scorer(level.keys, dim, scratch.dots, offer_to_rows);
  for (; begin < pairs.size(); begin = end) {
    const int64_t parent = pairs[begin].first;
    while (end < pairs.size() && pairs[end].first == parent) ++end;
    const int64_t sharing = static_cast<int64_t>(end - begin);
    // The probes of the rows sharing this parent, read where they are.
    auto& probe_rows = scratch.dots.probe_rows;
    probe_rows.resize(sharing * num_probes);
    for (int64_t q = 0; q < sharing; ++q)
      for (int64_t p = 0; p < num_probes; ++p)
        probe_rows[q * num_probes + p] = level.probes + ((first_row + pairs[begin + q].second) * num_probes + p) * dim;
    scorer.use_probe_rows(probe_rows.data(), sharing * num_probes);
    bounds.resize(sharing * num_probes);
    for (int64_t q = 0; q < sharing; ++q) refresh_bound(q);
    const int64_t first = parent * fanout;
    for_each_child(prefetcher, row_bytes, first, first + std::min(fanout, level.num_nodes - first), level.mask,
                   [&](int64_t child) { scorer.add(child); });
    scorer.flush();
  }
  for (RunningTopT<acc_t>& top : tops) top.finish();
}

}  // namespace mllm::cpu
