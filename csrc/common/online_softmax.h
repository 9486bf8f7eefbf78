// Online (streaming) softmax: a running maximum and a running sum of exp(logit - maximum),
// updated one tile of logits at a time, so a weighted sum can be accumulated in one pass.
#pragma once

#include <cmath>

#include "host_device.h"

namespace mllm {

template <typename acc_t>
struct OnlineSoftmax {
  acc_t max = -INFINITY;
  acc_t sum = 0;

  // Raises the running maximum to cover `tile_max`; returns the factor by which sums and
  // accumulators kept so far must be multiplied.
  MLLM_HOST_DEVICE acc_t rescale_to(acc_t tile_max) {
    if (!(tile_max > max)) return acc_t(1);
    const acc_t factor = max == -INFINITY ? acc_t(0) : std::exp(max - tile_max);
    max = tile_max;
    sum *= factor;
    return factor;
  }

  // The weight of one logit under the current maximum; adds it to the running sum.
  MLLM_HOST_DEVICE acc_t weigh(acc_t logit) {
    const acc_t weight = logit == -INFINITY ? acc_t(0) : std::exp(logit - max);
    sum += weight;
    return weight;
  }

  // log(sum_i exp(logit_i)), -inf when nothing was seen.
  MLLM_HOST_DEVICE acc_t log_sum_exp() const { return sum > 0 ? max + std::log(sum) : -INFINITY; }
};

}  // namespace mllm
