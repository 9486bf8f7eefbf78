// The fused descent of one query row: stream each candidate child's key once, score it against
// all probes, and keep a running top-t in the output row. No score matrix is materialised.
// int8 keys (float32 compute) go through the int8 screen once the top t is full: a row whose
// score bound cannot beat the t-th best is skipped without being scored (int8_screen.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/top_t.h"
#include "child_scoring.h"
#include "int8_screen.h"

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
  std::vector<acc_t> dots;  // [kMaxDotGroup, P] the probe scores of a group of children
  Int8Screen screen;        // int8 keys: the row's probes rounded to int8
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

// Selects the top `t` children of the `num_parents` ids in `parents` for query `b`; -1 parents
// are empty. With `skip_repeated`, a parent id repeated in the row is skipped so that each child
// counts once (callers whose parents are unique by construction pass false).
template <typename key_t, typename acc_t>
void descend_row(const LevelView<key_t, acc_t>& level, int64_t b, const int64_t* parents, int64_t num_parents,
                 int64_t fanout, bool skip_repeated, int64_t t, acc_t* out_scores, int64_t* out_ids,
                 RowScratch<acc_t>& scratch) {
  constexpr bool kScreen = MLLM_INT8_SCREEN && std::is_same_v<key_t, int8_t> && std::is_same_v<acc_t, float>;
  const acc_t* probes = level.probes + b * level.num_probes * level.dim;
  const int64_t row_bytes = level.dim * int64_t(sizeof(key_t));
  const int64_t num_probes = level.num_probes;
  RunningTopT<acc_t> top(out_scores, out_ids, t);
  auto push = [&](int64_t child, acc_t* child_dots) {
    offer(top, child_score<key_t>(child_dots, num_probes, level.scales, child, level.lse), child);
  };
  GroupedDots scorer(level.keys, level.dim, scratch.dots, push);
  scorer.use_probes(probes, num_probes);
  auto score_exactly = [&](int64_t child) {  // only while no child waits in `scorer` (it shares the dots)
    multi_dot(probes, num_probes, level.dim, level.keys + child * level.dim, scratch.dots.data());
    push(child, scratch.dots.data());
  };
  // int8 screen: once the top t is full, candidates are bounded Int8Screen::kKeys at a time and
  // those whose bound is strictly below the t-th score (they cannot rank before it) are skipped.
  // The others wait in `deferred`, and are scored best bound first: each exact score raises the
  // t-th score, so most of them end up skipped too.
  int screen_state = 0;  // 0: not prepared (the top t is not full yet), 1: screening, -1: off
  int64_t pending[Int8Screen::kKeys];
  int num_pending = 0;
  struct Deferred {
    float bound;
    int64_t child;
  };
  constexpr int kDeferred = 64;
  Deferred deferred[kScreen ? kDeferred : 1];
  int num_deferred = 0;
  auto flush_deferred = [&]() {
    // Best bound first, until the best left is below the t-th score (a few picks, no full sort).
    while (num_deferred > 0) {
      int best = 0;
      for (int i = 1; i < num_deferred; ++i) best = deferred[i].bound > deferred[best].bound ? i : best;
      if (deferred[best].bound < float(top.scores[top.capacity - 1])) break;
      score_exactly(deferred[best].child);
      deferred[best] = deferred[--num_deferred];
    }
    num_deferred = 0;
  };
  auto flush_pending = [&]() {
    const int8_t* rows[Int8Screen::kKeys];
    float row_scales[Int8Screen::kKeys], bounds[Int8Screen::kKeys];
    for (int j = 0; j < Int8Screen::kKeys; ++j) {
      const int64_t child = pending[std::min(j, num_pending - 1)];  // a short group repeats its last
      rows[j] = reinterpret_cast<const int8_t*>(level.keys + child * level.dim);
      row_scales[j] = level.scales[child];
    }
    const unsigned keep =
        scratch.screen.survivors(rows, row_scales, level.lse, float(top.scores[top.capacity - 1]), bounds);
    for (int j = 0; j < num_pending; ++j) {
      if (!(keep >> j & 1u)) continue;
      if (bounds[j] != bounds[j]) {  // no bound: score it now
        score_exactly(pending[j]);
        continue;
      }
      deferred[num_deferred++] = {bounds[j], pending[j]};
      if (num_deferred == kDeferred) flush_deferred();
    }
    num_pending = 0;
  };
  BlockPrefetcher prefetcher(level.keys, fanout * row_bytes, level.num_nodes * row_bytes, parents, num_parents);
  auto on_child = [&](int64_t child) {
    if constexpr (kScreen) {
      if (screen_state == 0 && top.size == top.capacity)
        screen_state = scratch.screen.prepare(probes, num_probes, level.dim) ? 1 : -1;
      if (screen_state == 1) {
        pending[num_pending++] = child;
        if (num_pending == Int8Screen::kKeys) flush_pending();
        return;
      }
    }
    scorer.add(child);
  };
  for (int64_t j = 0; j < num_parents; ++j) {
    const int64_t parent = parents[j];
    if (parent < 0 || (skip_repeated && repeats_earlier(parents, j))) continue;
    if (level.scales != nullptr && j + 1 < num_parents && parents[j + 1] >= 0)  // the next block's first scales
      prefetch_row(level.scales + parents[j + 1] * fanout, std::min<int64_t>(fanout, 64) * int64_t(sizeof(float)));
    const int64_t first = parent * fanout;
    for_each_child(prefetcher, row_bytes, first, first + std::min(fanout, level.num_nodes - first), level.mask,
                   on_child);
  }
  scorer.flush();
  if constexpr (kScreen) {
    if (num_pending > 0) flush_pending();
    if (num_deferred > 0) flush_deferred();
  }
  top.finish();
}

}  // namespace mllm::cpu
