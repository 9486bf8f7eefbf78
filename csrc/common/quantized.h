// int8 keys with one float32 scale per row (mllm_kernels.quantize_keys).
//
// A quantised key row n is (q[n, :] int8, scale[n] float32) and stands for scale[n] * q[n, :].
// Its probe scores are scale[n] * <probe_p, q[n, :]>: the raw dot product is accumulated in the
// compute type over the int8 values converted exactly, then multiplied by the row's scale once,
// before the probe reduction (max / logsumexp), so that the reduction sees the real scores.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace mllm {

// Largest magnitude of a quantised value: the symmetric range is [-127, 127] (-128 unused).
constexpr int kInt8KeyMax = 127;
// Largest magnitude of any int8 value: keys quantised elsewhere may hold -128, and bounds that
// must hold for every key row use this.
constexpr int kInt8ValueMax = 128;

// dots[p] *= scale for the P raw dot products of one int8 key row.
template <typename acc_t>
MLLM_HOST_DEVICE void scale_dots(acc_t* dots, int64_t num_probes, acc_t scale) {
  for (int64_t p = 0; p < num_probes; ++p) dots[p] *= scale;
}

// The value an int8 key element stands for.
template <typename acc_t>
MLLM_HOST_DEVICE acc_t dequantize(int8_t q, acc_t scale) {
  return scale * static_cast<acc_t>(q);
}

// ---------------------------------------------------------------------------------------------
// Score bounds for skipping rows (the CPU descent's int8 screen, csrc/cpu/int8_screen.h).
//
// A probe p (float32, length D) is rounded to integer digits r_d = round(p_d / s) with
// s = max_d |p_d| / M (M: the digit range, 127 for int8 digits). For an int8 key row q and its
// scale k, the exact real number k * <p, q> lies within k * s * <r, q> +- |k| * 128 * sum_d
// |p_d - s r_d| (as |q_d| <= 128). The float32 kernel computes fl(fl(<p, q>) * k), whose dot
// product differs from the real one by at most gamma(D) * sum_d |p_d q_d| <= gamma(D) * 128 *
// sum_d |p_d| (any summation order), and whose final product adds a relative 2^-24. So the
// kernel's score of row q for probe p is at most
//   k * s * <r, q> + |k| * slack_p  (+ a relative 2^-22 for the last roundings),
// slack_p = 128 * (sum_d |p_d - s r_d| + gamma(D) * sum_d |p_d|), and at least
//   k * s * <r, q> - |k| * slack_p  (less the same relative margin).
// The kernel's max and logsumexp over the probes are at least the largest of these lower bounds
// (its logsumexp adds log(sum) >= 0 to the max). A row whose upper bound is below the t-th best
// lower bound of other rows cannot enter the top t: it need not be scored exactly.
//
// With two digits per element (the VNNI screen of a single probe), p = s r + s' r' + e, r' the
// digits of the remainder p - s r at the scale s' = s / 254: the same bounds hold with
// s <r, q> + s' <r', q> in place of s <r, q> and e in place of p - s r, whose terms are 254 times
// smaller.

// gamma(n) = n u / (1 - n u), u = 2^-24: the float32 rounding bound of an n-term sum.
inline double float_sum_gamma(int64_t n) {
  const double nu = static_cast<double>(n) * 0x1p-24;
  return nu < 0.5 ? nu / (1.0 - nu) : INFINITY;
}

// Relative inflation of a probe score bound k * s * <r, q> + |k| * slack (computed in double) for
// the kernel's last float rounding (the product by the row's scale) and the bound's own double
// arithmetic.
constexpr double kScoreBoundRelative = 0x1p-22;
// The logsumexp of P float scores is at most their maximum + log(P); its float evaluation adds
// at most a few ulps of the result and of log(P): inflate by this relative and absolute margin.
constexpr double kLseBoundRelative = 0x1p-20;
constexpr double kLseBoundAbsolute = 0x1p-16;

}  // namespace mllm
