// Reductions of the P probe scores of one candidate into its score, and their gradients.
//
// "max" and "lse" (logsumexp) follow torch.amax / torch.logsumexp: NaN propagates, logsumexp
// of all -inf is -inf and of any +inf is +inf.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace mllm {

template <typename acc_t>
MLLM_HOST_DEVICE acc_t probe_max(const acc_t* dots, int64_t num_probes) {
  acc_t best = dots[0];
  for (int64_t p = 0; p < num_probes; ++p) {
    if (dots[p] != dots[p]) return dots[p];
    best = dots[p] > best ? dots[p] : best;
  }
  return best;
}

template <typename acc_t>
MLLM_HOST_DEVICE acc_t probe_logsumexp(const acc_t* dots, int64_t num_probes) {
  const acc_t best = probe_max(dots, num_probes);
  if (best != best || std::isinf(best)) return best;
  acc_t sum = 0;
  for (int64_t p = 0; p < num_probes; ++p) sum += std::exp(dots[p] - best);
  return best + std::log(sum);
}

template <typename acc_t>
MLLM_HOST_DEVICE acc_t reduce_probes(const acc_t* dots, int64_t num_probes, bool lse) {
  return lse ? probe_logsumexp(dots, num_probes) : probe_max(dots, num_probes);
}

// d score / d dots[p] for a score computed by reduce_probes. For "max" the gradient is split
// evenly between exact ties, as torch.amax's backward does.
template <typename acc_t>
MLLM_HOST_DEVICE void reduce_probes_grad(const acc_t* dots, int64_t num_probes, bool lse, acc_t score,
                                         acc_t* weights) {
  if (lse) {
    for (int64_t p = 0; p < num_probes; ++p) weights[p] = std::exp(dots[p] - score);
    return;
  }
  int64_t ties = 0;
  for (int64_t p = 0; p < num_probes; ++p) ties += dots[p] == score;
  for (int64_t p = 0; p < num_probes; ++p) weights[p] = dots[p] == score ? acc_t(1) / acc_t(ties) : acc_t(0);
}

}  // namespace mllm
