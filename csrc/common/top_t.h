// The running top-t selection used by every descent kernel.
//
// Order: higher score first; equal scores: smaller node id first. NaN scores are never kept.
// The entries live in caller-provided storage (an output row on the CPU, registers or shared
// memory on a GPU), so selecting never writes a score matrix.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace mllm {

// True when (score_a, id_a) ranks before (score_b, id_b). Ids compare as unsigned so that the
// empty id -1 ranks after every real node.
template <typename score_t>
MLLM_HOST_DEVICE bool ranks_before(score_t score_a, int64_t id_a, score_t score_b, int64_t id_b) {
  return score_a > score_b ||
         (score_a == score_b && static_cast<uint64_t>(id_a) < static_cast<uint64_t>(id_b));
}

template <typename score_t>
struct RunningTopT {
  score_t* scores;   // [capacity], sorted by ranks_before
  int64_t* ids;      // [capacity]
  int64_t capacity;  // t
  int64_t size;

  MLLM_HOST_DEVICE RunningTopT(score_t* scores_, int64_t* ids_, int64_t capacity_)
      : scores(scores_), ids(ids_), capacity(capacity_), size(0) {}

  // Cheap rejection test for the common case of a candidate that cannot enter the full list.
  MLLM_HOST_DEVICE bool admits(score_t score, int64_t id) const {
    return size < capacity || ranks_before(score, id, scores[capacity - 1], ids[capacity - 1]);
  }

  MLLM_HOST_DEVICE void push(score_t score, int64_t id) {
    if (score != score || !admits(score, id)) return;  // NaN is never selected
    int64_t pos = size < capacity ? size++ : capacity - 1;
    while (pos > 0 && ranks_before(score, id, scores[pos - 1], ids[pos - 1])) {
      scores[pos] = scores[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    scores[pos] = score;
    ids[pos] = id;
  }

  // Pads the unused tail with the empty entry (-1, -inf).
  MLLM_HOST_DEVICE void finish() {
    for (int64_t i = size; i < capacity; ++i) {
      scores[i] = -INFINITY;
      ids[i] = -1;
    }
  }
};

}  // namespace mllm
