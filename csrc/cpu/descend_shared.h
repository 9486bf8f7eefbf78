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
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (parent, row) of every candidate block, sorted
  std::vector<ChildRange> blocks;                  // the distinct parents' children, ascending
  std::vector<size_t> block_pairs;                 // [blocks + 1]: block k's pairs start at block_pairs[k]
  std::vector<const acc_t*> probe_rows;            // [pairs, P]: the probes of each pair's row
  std::vector<acc_t> bounds;                       // [pairs, P]: see refresh_bound
  std::vector<acc_t> dots;                         // [kMaxDotGroup, rows of a block, P]
  std::vector<RunningTopT<acc_t>> tops;            // per row: its running top t
};

// Selects the top `t` children for the query rows first_row .. first_row + num_rows: row b's
// parents are parents_of(b)[0 .. num_parents) (-1 empty; a repeated one is skipped with
// `skip_repeated`), and its result goes to out_scores + b * t and out_ids + b * t. The blocks
// are read in for_each_chunk's order (a few at a time, in turn), each chunk of a block's
// children scored against the probes of every row that selected it.
template <typename key_t, typename acc_t, typename ParentsOf>
void descend_rows_shared(const LevelView<key_t, acc_t>& level, int64_t first_row, int64_t num_rows,
                         const ParentsOf& parents_of, int64_t num_parents, int64_t fanout, bool skip_repeated,
                         int64_t t, acc_t* out_scores, int64_t* out_ids, SharedScratch<acc_t>& scratch) {
  const int64_t num_probes = level.num_probes, dim = level.dim;
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
  auto& blocks = scratch.blocks;
  auto& block_pairs = scratch.block_pairs;
  blocks.clear();
  block_pairs.clear();
  for (size_t i = 0; i < pairs.size(); ++i) {
    if (i > 0 && pairs[i].first == pairs[i - 1].first) continue;
    blocks.push_back(children_of(pairs[i].first, fanout, level.num_nodes));
    block_pairs.push_back(i);
  }
  block_pairs.push_back(pairs.size());
  size_t most_sharing = 0;  // the most rows that chose one parent
  for (size_t k = 0; k + 1 < block_pairs.size(); ++k)
    most_sharing = std::max(most_sharing, block_pairs[k + 1] - block_pairs[k]);

  auto& tops = scratch.tops;
  tops.clear();
  for (int64_t r = 0; r < num_rows; ++r)
    tops.emplace_back(out_scores + (first_row + r) * t, out_ids + (first_row + r) * t, t);
  // The probes of each pair's row, read where they are.
  auto& probe_rows = scratch.probe_rows;
  probe_rows.resize(pairs.size() * num_probes);
  for (size_t i = 0; i < pairs.size(); ++i)
    for (int64_t p = 0; p < num_probes; ++p)
      probe_rows[i * num_probes + p] = level.probes + ((first_row + pairs[i].second) * num_probes + p) * dim;
  // bounds[i, :] = the score a child's probe dot must reach for row pairs[i] to take the child:
  // for "max", a child none of whose dots reach the row's t-th score cannot enter its full top t
  // (and a NaN dot reaches nothing: its score is NaN, never kept). -inf where that does not hold
  // (a top not yet full, "lse").
  auto& bounds = scratch.bounds;
  bounds.resize(pairs.size() * num_probes);
  auto refresh_bound = [&](size_t i) {
    const RunningTopT<acc_t>& top = tops[pairs[i].second];
    const acc_t bound = level.lse || top.size < top.capacity ? -std::numeric_limits<acc_t>::infinity()
                                                                : top.scores[top.capacity - 1];
    std::fill_n(bounds.data() + i * num_probes, num_probes, bound);
  };
  // Offers `child`, whose dots against the probes of the pairs [begin, end) are child_dots, to
  // those pairs' rows.
  auto offer_to_rows = [&](size_t begin, size_t end, int64_t child, acc_t* child_dots) {
    const int64_t dots = static_cast<int64_t>(end - begin) * num_probes;
    if constexpr (std::is_same_v<key_t, int8_t>) scale_dots(child_dots, dots, static_cast<acc_t>(level.scales[child]));
    // Most children reach no row's bound: the dots are compared with the bounds a vector at a
    // time, and only the rows with a dot at its bound or above are offered the child.
    const acc_t* child_bounds = bounds.data() + begin * num_probes;
    int64_t last_offered = -1;
    for (int64_t i = 0; i < dots; i += kMaskBits) {
      for (uint32_t hits = at_least_mask(child_dots + i, child_bounds + i, std::min(kMaskBits, dots - i));
           hits != 0; hits &= hits - 1) {
        const int64_t dot = i + __builtin_ctz(hits);
        const int64_t q = num_probes == 1 ? dot : dot / num_probes;
        if (q == last_offered) continue;  // through another of its probes
        last_offered = q;
        offer(tops[pairs[begin + q].second], reduce_probes(child_dots + q * num_probes, num_probes, level.lse), child);
        refresh_bound(begin + q);
      }
    }
  };
  auto& dots = scratch.dots;
  dots.resize(kMaxDotGroup * most_sharing * num_probes);
  const int64_t row_bytes = dim * int64_t(sizeof(key_t));
  PrefetchSpread spread;
  for_each_chunk(level.keys, row_bytes, blocks.data(), static_cast<int64_t>(blocks.size()), kMaxDotGroup,
                 [&](int64_t block, int64_t first, int64_t count) {
                   const size_t begin = block_pairs[block], end = block_pairs[block + 1];
                   // A block's bounds are set at its first chunk, from the tops as the chunks read
                   // before it left them, then raised by offer_to_rows for the rows it offers to (a
                   // bound left lower, of a row whose top another block raised, only lets more
                   // children through to offer()).
                   if (first == blocks[block].first)
                     for (size_t i = begin; i < end; ++i) refresh_bound(i);
                   int64_t ids[kMaxDotGroup];
                   int num_ids = 0;
                   for (int64_t child = first; child < first + count; ++child)
                     if (level.mask == nullptr || level.mask[child]) ids[num_ids++] = child;
                   if (num_ids == 0) return;
                   const int64_t rows = static_cast<int64_t>(end - begin) * num_probes;
                   multi_dot_keys(probe_rows.data() + begin * num_probes, rows, dim, level.keys, ids, num_ids,
                                  dots.data(), &spread);
                   for (int i = 0; i < num_ids; ++i) offer_to_rows(begin, end, ids[i], dots.data() + i * rows);
                 },
                 &spread);
  for (RunningTopT<acc_t>& top : tops) top.finish();
}

}  // namespace mllm::cpu
