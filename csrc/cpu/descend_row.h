// The fused descent of one query row: stream each candidate child's key once, score it against
// all probes, and keep a running top-t in the output row. No score matrix is materialised.
// int8 keys (float32 compute) go through the int8 screen (int8_screen.h): every child is bounded,
// and only those whose bounds leave them a chance are scored exactly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/top_t.h"
#include "child_scoring.h"
#include "int8_screen.h"
#include "prefetch_stream.h"

namespace mllm::cpu {

// One level as the row kernel sees it: raw pointers, sizes, and the row's output.
template <typename key_t, typename acc_t>
struct LevelView {
  const acc_t* probes;  // [B, P, D], converted to acc_t
  const key_t* keys;    // [N, D]
  const bool* mask;     // [N] or nullptr
  const float* scales;  // [N] per-row scales of int8 keys, else nullptr
  int64_t num_probes;
  int64_t dim;
  int64_t num_nodes;
  bool lse;
};

// Per-thread scratch of descend_row, reused across rows and calls.
template <typename acc_t>
struct RowScratch {
  GroupedDotsScratch<acc_t> dots;  // the probe scores of a group of children
  Int8Screen screen;        // int8 keys: the row's probes rounded to integer digits
  struct Candidate {
    float upper;  // the child's score bound (+inf: none known)
    int64_t child;
  };
  std::vector<Candidate> candidates;  // int8 keys: the children the screen could not rule out
  std::vector<float> lower_scores;    // [t] int8 keys: the t best lower bounds of the screened children
  std::vector<int64_t> lower_ids;     // [t]
  std::vector<ChildRange> blocks;     // the row's children blocks (row_blocks)
};

// Whether parents[j] already appears in parents[0 .. j) (its children were offered already).
inline bool repeats_earlier(const int64_t* parents, int64_t j) {
  return std::find(parents, parents + j, parents[j]) != parents + j;
}

// top.push(score, id), rejecting first (without the call) the many candidates that cannot enter
// a full top t; NaN is rejected too (never kept), and a tie goes to push, which breaks it by id.
template <typename acc_t>
inline void offer(RunningTopT<acc_t>& top, acc_t score, int64_t id) {
  if (top.size == top.capacity && !(score >= top.scores[top.capacity - 1])) return;
  top.push(score, id);
}

// The children blocks of `parents` into `blocks`, in order: -1 parents are empty, and with
// `skip_repeated` a parent repeated in the row is read once; the last block may be short.
template <typename key_t, typename acc_t>
inline void row_blocks(const LevelView<key_t, acc_t>& level, const int64_t* parents, int64_t num_parents,
                       int64_t fanout, bool skip_repeated, std::vector<ChildRange>& blocks) {
  blocks.clear();
  for (int64_t j = 0; j < num_parents; ++j) {
    const int64_t parent = parents[j];
    if (parent < 0 || (skip_repeated && repeats_earlier(parents, j))) continue;
    blocks.push_back(children_of(parent, fanout, level.num_nodes));
  }
}

// descend_row for int8 keys through the screen (after scratch.screen.prepare() succeeded).
//
// Every child is bounded from above and below, Int8Screen::kKeys at a time, from one integer dot
// product per probe. The t best lower bounds so far (of distinct children) give a threshold: a
// child whose upper bound is below it is beaten by t children, and is dropped. Only the children
// left at the end are scored exactly (best bound first, until the bound is below the t-th exact
// score): with tight bounds, a few more than t per row. The result is that of scoring every
// child exactly.
inline void descend_row_screened(const LevelView<int8_t, float>& level, const float* probes, const int64_t* parents,
                                 int64_t num_parents, int64_t fanout, bool skip_repeated, int64_t t,
                                 float* out_scores, int64_t* out_ids, RowScratch<float>& scratch) {
  using Candidate = RowScratch<float>::Candidate;
  std::vector<Candidate>& candidates = scratch.candidates;
  candidates.clear();
  scratch.lower_scores.resize(t);
  scratch.lower_ids.resize(t);
  RunningTopT<float> lower(scratch.lower_scores.data(), scratch.lower_ids.data(), t);
  auto threshold = [&]() { return lower.size == lower.capacity ? lower.scores[t - 1] : -INFINITY; };
  // Candidates are pruned against the threshold when they reach `prune_at`; the limit doubles
  // when a pruning keeps more than half (many near ties), so that pruning costs O(1) per child.
  size_t prune_at = 64;
  auto prune = [&]() {
    const float at_least = threshold();
    candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                    [&](const Candidate& c) { return c.upper < at_least; }),
                     candidates.end());
  };
  PrefetchSpread spread;
  constexpr int kKeys = Int8Screen::kKeys;
  constexpr int64_t kScreenChunk = 8;  // children read from one block in turn: whole screen groups
  static_assert(kScreenChunk % kKeys == 0, "a chunk holds whole screen groups");
  // The children [first, first + count) of one block, count <= kKeys; bit j of `live`: child
  // first + j is not masked.
  auto screen_group = [&](int64_t first, int count, unsigned live) {
    const int8_t* rows[kKeys];
    float short_scales[kKeys], upper[kKeys], low[kKeys];
    for (int j = 0; j < kKeys; ++j) rows[j] = level.keys + (first + std::min(j, count - 1)) * level.dim;
    const float* scales = level.scales + first;
    if (count < kKeys) {  // a short group repeats its last child
      for (int j = 0; j < kKeys; ++j) short_scales[j] = scales[std::min(j, count - 1)];
      scales = short_scales;
    }
    unsigned keep = scratch.screen.survivors(rows, scales, level.lse, threshold(), upper, low, &spread) & live;
    for (; keep != 0; keep &= keep - 1) {
      const int j = __builtin_ctz(keep);
      candidates.push_back({upper[j] == upper[j] ? upper[j] : INFINITY, first + j});
      offer(lower, low[j], first + j);  // NaN (no bound) is never kept
    }
    if (candidates.size() >= prune_at) {
      prune();
      if (candidates.size() > prune_at / 2) prune_at *= 2;
    }
  };
  row_blocks(level, parents, num_parents, fanout, skip_repeated, scratch.blocks);
  for_each_chunk(
      level.keys, level.dim, scratch.blocks.data(), static_cast<int64_t>(scratch.blocks.size()), kScreenChunk,
      [&](int64_t, int64_t first, int64_t count) {
        for (int64_t group = first; group < first + count; group += kKeys) {
          const int size = static_cast<int>(std::min<int64_t>(kKeys, first + count - group));
          unsigned live = (1u << size) - 1;
          if (level.mask != nullptr)
            for (int j = 0; j < size; ++j) live &= ~(unsigned(!level.mask[group + j]) << j);
          if (live != 0) screen_group(group, size, live);
        }
      },
      [&](int64_t first, int64_t count) { prefetch_row(level.scales + first, count * int64_t(sizeof(float))); },
      &spread);
  prune();
  std::sort(candidates.begin(), candidates.end(),
            [](const Candidate& a, const Candidate& b) { return a.upper > b.upper; });
  RunningTopT<float> top(out_scores, out_ids, t);
  GroupedDots scorer(level.keys, level.dim, scratch.dots, [&](int64_t child, float* child_dots) {
    offer(top, child_score<int8_t>(child_dots, level.num_probes, level.scales, child, level.lse), child);
  });
  scorer.use_probes(probes, level.num_probes);
  // Scored kMaxDotGroup at a time (independent dot products: one alone is bound by the FMA
  // latency), so the t-th score seen by the stopping test may lag by a group: a few more are scored.
  for (const Candidate& c : candidates) {
    if (top.size == top.capacity && c.upper < top.scores[t - 1]) break;  // this and the rest cannot rank
    scorer.add(c.child);
  }
  scorer.flush();
  top.finish();
}

// Whether the int8 screen can take keys of type key_t scored in acc_t: int8 keys in float32, where
// the screen is built.
template <typename key_t, typename acc_t>
constexpr bool kScreenable = MLLM_INT8_SCREEN && std::is_same_v<key_t, int8_t> && std::is_same_v<acc_t, float>;

// Whether descend_row screens a row of `children` candidates and a top `t`: more than 4t children.
// The screen bounds every child and scores the survivors exactly, at least t of them, so with few
// children per t it only adds work (a top level of 25 nodes and t = 8 took twice as long as
// scoring them all exactly).
template <typename key_t, typename acc_t>
constexpr bool screens(int64_t children, int64_t t) {
  return kScreenable<key_t, acc_t> && children > 4 * t;
}

// Selects the top `t` children of the `num_parents` ids in `parents` for query `b`; -1 parents
// are empty. With `skip_repeated`, a parent id repeated in the row is skipped so that each child
// counts once (callers whose parents are unique by construction pass false).
template <typename key_t, typename acc_t>
void descend_row(const LevelView<key_t, acc_t>& level, int64_t b, const int64_t* parents, int64_t num_parents,
                 int64_t fanout, bool skip_repeated, int64_t t, acc_t* out_scores, int64_t* out_ids,
                 RowScratch<acc_t>& scratch) {
  const acc_t* probes = level.probes + b * level.num_probes * level.dim;
  if constexpr (kScreenable<key_t, acc_t>) {
    if (screens<key_t, acc_t>(num_parents * fanout, t) && scratch.screen.prepare(probes, level.num_probes, level.dim))
      return descend_row_screened(level, probes, parents, num_parents, fanout, skip_repeated, t, out_scores, out_ids,
                                  scratch);
  }
  RunningTopT<acc_t> top(out_scores, out_ids, t);
  auto push = [&](int64_t child, acc_t* child_dots) {
    offer(top, child_score<key_t>(child_dots, level.num_probes, level.scales, child, level.lse), child);
  };
  PrefetchSpread spread;
  GroupedDots scorer(level.keys, level.dim, scratch.dots, push, &spread);
  scorer.use_probes(probes, level.num_probes);
  row_blocks(level, parents, num_parents, fanout, skip_repeated, scratch.blocks);
  for_each_chunk(
      level.keys, level.dim * int64_t(sizeof(key_t)), scratch.blocks.data(),
      static_cast<int64_t>(scratch.blocks.size()), kMaxDotGroup,
      [&](int64_t, int64_t first, int64_t count) {
        for (int64_t child = first; child < first + count; ++child)
          if (level.mask == nullptr || level.mask[child]) scorer.add(child);
      },
      &spread);
  scorer.flush();
  top.finish();
}

}  // namespace mllm::cpu
