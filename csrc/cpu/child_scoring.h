// Scoring the children of parent blocks: the groups of children scored together (descend_row),
// and a child's score from its dot products (every descent and score_children). The walk over
// the blocks and their prefetch stream: prefetch_stream.h.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/probe_reduce.h"
#include "../common/quantized.h"
#include "simd.h"

namespace mllm::cpu {

// GroupedDots' buffers, kept by the caller across rows and calls (no allocation per row).
template <typename acc_t>
struct GroupedDotsScratch {
  std::vector<acc_t> dots;                // [kMaxDotGroup, rows] the dot products of a group
  std::vector<const acc_t*> probe_rows;   // use_probes' row pointers
};

// Children added here are scored kMaxDotGroup at a time against `num_rows` probe rows
// (multi_dot_keys shares each probe load between them). on_scored(child, dots) then gets each
// child's [num_rows] dot products, in the order the children were added; it may change them.
template <typename key_t, typename acc_t, typename OnScored>
class GroupedDots {
 public:
  // keys: [N, dim]. spread: the key stream's prefetch to issue while scoring (PrefetchSpread), or null.
  GroupedDots(const key_t* keys, int64_t dim, GroupedDotsScratch<acc_t>& scratch, OnScored on_scored,
              PrefetchSpread* spread = nullptr)
      : keys_(keys), dim_(dim), scratch_(scratch), on_scored_(on_scored), spread_(spread) {}

  // The probe rows ([num_rows, dim], contiguous) that the children added next are scored
  // against. Only when no child is waiting (before the first add, or after a flush).
  void use_probes(const acc_t* probes, int64_t num_rows) {
    scratch_.probe_rows.resize(num_rows);
    for (int64_t r = 0; r < num_rows; ++r) scratch_.probe_rows[r] = probes + r * dim_;
    use_probe_rows(scratch_.probe_rows.data(), num_rows);
  }

  // use_probes for rows anywhere: rows[r] is row r's first element. The pointers must stay valid
  // until the next flush.
  void use_probe_rows(const acc_t* const* rows, int64_t num_rows) {
    rows_ = rows;
    num_rows_ = num_rows;
    scratch_.dots.resize(kMaxDotGroup * num_rows);
  }

  void add(int64_t child) {
    group_[size_++] = child;
    if (size_ == kMaxDotGroup) flush();
  }

  // Scores the children waiting, if any.
  void flush() {
    if (size_ == 0) return;
    acc_t* dots = scratch_.dots.data();
    multi_dot_keys(rows_, num_rows_, dim_, keys_, group_, size_, dots, spread_);
    for (int i = 0; i < size_; ++i) on_scored_(group_[i], dots + i * num_rows_);
    size_ = 0;
  }

 private:
  const key_t* keys_;
  int64_t dim_;
  GroupedDotsScratch<acc_t>& scratch_;
  OnScored on_scored_;
  PrefetchSpread* spread_;
  const acc_t* const* rows_ = nullptr;
  int64_t num_rows_ = 0;
  int64_t group_[kMaxDotGroup];
  int size_ = 0;
};

// A child's score from its [num_probes] raw dot products: the probe reduction, after scaling the
// dots in place by the child's row scale for int8 keys (`scales`: [N]; unused otherwise).
template <typename key_t, typename acc_t>
inline acc_t child_score(acc_t* dots, int64_t num_probes, const float* scales, int64_t child, bool lse) {
  if constexpr (std::is_same_v<key_t, int8_t>) scale_dots(dots, num_probes, static_cast<acc_t>(scales[child]));
  return reduce_probes(dots, num_probes, lse);
}

}  // namespace mllm::cpu
