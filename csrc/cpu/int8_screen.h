// The int8 screen of the CPU descent: cheap bounds of a quantised key row's score, from above
// and below, so that rows which cannot enter the top t are not scored exactly.
//
// Why: scoring an int8 row exactly costs as much as a float16 row (P * D float32 FMAs plus the
// conversions), so on its own int8 saves memory traffic but not compute, and the descent is
// compute-bound on a few cores. The screen rounds each probe to integer digits once per query
// row and bounds every candidate's score from one integer dot product per probe. descend_row
// drops a candidate whose upper bound is below the t-th best lower bound (t other rows beat it)
// and scores the others by the exact float32 path. The results are therefore identical to
// scoring every row exactly: the screen only removes work. The bounds and their rounding
// analysis are in common/quantized.h.
//
// Two builds, whichever the compiler targets:
// - AVX-512 VNNI and BW: int8 digits, vpdpbusd (64 multiply-adds per instruction, the keys
//   offset to u8), eight keys per call, two probes at a time (16 int32 lanes). A single probe
//   gets two digits per element instead (its digits and its remainder's, in the lanes a second
//   probe would take), which makes the bound 254 times tighter: on clustered data, 9% of the
//   rows survived the screen instead of 33%;
// - AVX2: int16 digits, vpmaddwd on the keys sign-extended to int16 (16 multiply-adds per
//   instruction), eight keys per call, their bounds computed in the eight float lanes. The
//   digits carry up to 15 bits, so the bound is tight: the rows scored exactly are nearly all
//   those that enter the top t.
// Elsewhere prepare() returns false and every row is scored exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/quantized.h"
#include "simd.h"

// MLLM_INT8_SCREEN: 0 (no screen), MLLM_SCREEN_VNNI or MLLM_SCREEN_AVX2, whichever the target allows.
#define MLLM_SCREEN_VNNI 1
#define MLLM_SCREEN_AVX2 2
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MLLM_INT8_SCREEN MLLM_SCREEN_VNNI
#elif (defined(__x86_64__) || defined(_M_X64)) && defined(__AVX2__)
#include <immintrin.h>
#define MLLM_INT8_SCREEN MLLM_SCREEN_AVX2
#else
#define MLLM_INT8_SCREEN 0
#endif

namespace mllm::cpu {

#if MLLM_INT8_SCREEN == MLLM_SCREEN_VNNI
using ScreenDigit = int8_t;
#else
using ScreenDigit = int16_t;
#endif

// Largest magnitude of a probe's digit for rows of `dim` elements. vpdpbusd sums four u8 x s8
// products in int32: the int8 range. vpmaddwd sums int16 x int16 pairs in int32 exactly; the
// dot product's magnitude, at most 128 * M * dim, must stay within int32.
inline int screen_digit_max(int64_t dim) {
#if MLLM_INT8_SCREEN == MLLM_SCREEN_VNNI
  (void)dim;
  return kInt8KeyMax;
#else
  return static_cast<int>(std::min<int64_t>(32767, INT32_MAX / (128 * std::max<int64_t>(dim, 1))));
#endif
}

#if MLLM_INT8_SCREEN
namespace detail {
// A probe row's max |x|, sum |x| (float sums, see prepare) and whether it is all finite.
struct ProbeStats {
  float max_abs;
  double abs_sum;
  bool finite;
};

// The scalar tails (elements [d, dim)) of probe_stats and round_probe below.
inline void probe_stats_tail(const float* x, int64_t d, int64_t dim, ProbeStats& stats) {
  for (; d < dim; ++d) {
    stats.finite = stats.finite && std::isfinite(x[d]);
    stats.max_abs = std::max(stats.max_abs, std::fabs(x[d]));
    stats.abs_sum += std::fabs(x[d]);
  }
  stats.finite = stats.finite && std::isfinite(stats.max_abs);
}
inline void round_probe_tail(const float* x, int64_t d, int64_t dim, float s, float inv, int digit_max,
                             ScreenDigit* digits, double& err, int64_t& digit_sum, float* remainders) {
  for (; d < dim; ++d) {
    const int r = std::clamp(static_cast<int>(std::nearbyint(x[d] * inv)), -digit_max, digit_max);
    const float remainder = std::fma(-s, static_cast<float>(r), x[d]);
    if (remainders != nullptr) remainders[d] = remainder;
    err += std::fabs(remainder);
    digit_sum += r;
    digits[d] = static_cast<ScreenDigit>(r);
  }
}

// probe_stats and round_probe run once per query row and level (P * D values, against the
// thousands of key rows screened): AVX2 serves both ISAs.
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline __m256 abs_ps(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

// max |x|, sum |x| and whether all of x[0, dim) is finite.
inline ProbeStats probe_stats(const float* x, int64_t dim) {
  int64_t d = 0;
  __m256 vmax = _mm256_setzero_ps(), vabs = _mm256_setzero_ps();
  __m256 finite = _mm256_setzero_ps();  // x * 0 is 0 for finite x, NaN otherwise
  for (; d + 8 <= dim; d += 8) {
    const __m256 v = _mm256_loadu_ps(x + d);
    vmax = _mm256_max_ps(vmax, abs_ps(v));
    vabs = _mm256_add_ps(vabs, abs_ps(v));
    finite = _mm256_add_ps(finite, _mm256_mul_ps(v, _mm256_setzero_ps()));
  }
  ProbeStats stats{hmax(vmax), hsum(vabs), hsum(finite) == 0.0f};
  probe_stats_tail(x, d, dim, stats);
  return stats;
}

// digits[d] = r = round(x[d] * inv) clamped to the digit range; err += sum |x - s r| (each
// term one fused rounding, whatever rounding gave r), digit_sum += sum r; the terms x - s r
// themselves go to `remainders` unless it is null.
inline void round_probe(const float* x, int64_t dim, float s, float inv, int digit_max, ScreenDigit* digits,
                        double& err, int64_t& digit_sum, float* remainders = nullptr) {
  int64_t d = 0;
  __m256 verr = _mm256_setzero_ps();
  __m256i vsum = _mm256_setzero_si256();
  const __m256 vs = _mm256_set1_ps(s), vinv = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-digit_max), hi = _mm256_set1_epi32(digit_max);
  alignas(32) int32_t lanes[8];
  for (; d + 8 <= dim; d += 8) {
    const __m256 v = _mm256_loadu_ps(x + d);
    const __m256i r = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(_mm256_mul_ps(v, vinv))));
    const __m256 remainder = _mm256_fnmadd_ps(vs, _mm256_cvtepi32_ps(r), v);
    if (remainders != nullptr) _mm256_storeu_ps(remainders + d, remainder);
    verr = _mm256_add_ps(verr, abs_ps(remainder));
    vsum = _mm256_add_epi32(vsum, r);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), r);
    for (int i = 0; i < 8; ++i) digits[d + i] = static_cast<ScreenDigit>(lanes[i]);
  }
  err += hsum(verr);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vsum);
  for (int i = 0; i < 8; ++i) digit_sum += lanes[i];
  round_probe_tail(x, d, dim, s, inv, digit_max, digits, err, digit_sum, remainders);
}
}  // namespace detail
#endif

#if MLLM_INT8_SCREEN == MLLM_SCREEN_VNNI
namespace detail {

// max, permute and permutexvar with an explicit pass-through operand: GCC 12's plain intrinsics
// pass an undefined vector, which trips -Wuninitialized once inlined (GCC bug 105593).
inline __m512 max_ps(__m512 a, __m512 b) { return _mm512_mask_max_ps(a, 0xFFFF, a, b); }
template <int kImm>
inline __m512 permute_ps(__m512 a) {
  return _mm512_mask_permute_ps(a, 0xFFFF, a, kImm);
}
inline __m512 permutexvar_ps(__m512i index, __m512 a) { return _mm512_mask_permutexvar_ps(a, 0xFFFF, index, a); }
inline __m512i permutexvar_epi32(__m512i index, __m512i a) {
  return _mm512_mask_permutexvar_epi32(a, 0xFFFF, index, a);
}

// Lane i of the result: the sum of the 16 int32 lanes of v[i], i < 16 (a transposed reduction:
// four levels of pairwise shuffles and adds instead of sixteen horizontal sums).
__attribute__((always_inline)) inline __m512i reduce16_epi32(const __m512i* v) {
  // 64-bit lane indices of two-source permutes (8 + i: lane i of the second source). Permutes
  // rather than _mm512_shuffle_i64x2, whose GCC 12 expansion trips -Wuninitialized.
  const __m512i low = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);    // 256-bit halves 0 of a, b
  const __m512i high = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);  // halves 1
  const __m512i even = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13);   // 128-bit quarters 0, 2
  const __m512i odd = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);   // quarters 1, 3
  __m512i w[8];
  for (int i = 0; i < 8; ++i) {  // w[i] = [v[2i] folded to 8 lanes | v[2i+1] folded to 8 lanes]
    const __m512i a = v[2 * i], b = v[2 * i + 1];
    w[i] = _mm512_add_epi32(_mm512_permutex2var_epi64(a, low, b), _mm512_permutex2var_epi64(a, high, b));
  }
  __m512i x[4];
  for (int i = 0; i < 4; ++i) {  // x[i]: 128-bit quarter q holds 4 lanes of v[4i + q]
    const __m512i a = w[2 * i], b = w[2 * i + 1];
    x[i] = _mm512_add_epi32(_mm512_permutex2var_epi64(a, even, b), _mm512_permutex2var_epi64(a, odd, b));
  }
  // y0 quarter q: 2 lanes of v[q], 2 of v[4 + q]; y1: v[8 + q], v[12 + q]
  const __m512i y0 = _mm512_add_epi32(_mm512_unpacklo_epi64(x[0], x[1]), _mm512_unpackhi_epi64(x[0], x[1]));
  const __m512i y1 = _mm512_add_epi32(_mm512_unpacklo_epi64(x[2], x[3]), _mm512_unpackhi_epi64(x[2], x[3]));
  // z quarter q: the sums of v[q], v[4 + q], v[8 + q], v[12 + q]
  const __m512 f0 = _mm512_castsi512_ps(y0), f1 = _mm512_castsi512_ps(y1);
  const __m512i z = _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(f0, f1, _MM_SHUFFLE(2, 0, 2, 0))),
                                     _mm512_castps_si512(_mm512_shuffle_ps(f0, f1, _MM_SHUFFLE(3, 1, 3, 1))));
  return permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
}

// sums[2 * j + r] = sum_d (keys[j][d] + 128) * digits[r * stride + d] for 8 key rows j and
// r < kProbes (0 for r >= kProbes, kProbes <= 2); int32, exact for dim <= 65536. Bytes past dim
// are masked off (the digits are zero there). `spread` (may be null): see PrefetchSpread.
template <int kProbes>
__attribute__((always_inline)) inline void screen_dots(const int8_t* const* keys, const int8_t* digits, int64_t stride,
                                                       int64_t dim, int32_t* sums, PrefetchSpread* spread) {
  static_assert(kProbes == 1 || kProbes == 2, "two probes per block");
  __m512i acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // int8 q -> uint8 q + 128
  const char* prefetch_next = spread != nullptr ? spread->next : nullptr;
  const char* const prefetch_end = spread != nullptr ? spread->end : nullptr;
  // tail: the bytes of a last partial step (0: a whole one, read without a mask).
  auto step = [&](int64_t d, __mmask64 tail) {
    prefetch_next = prefetch_lines(prefetch_next, prefetch_end, 4);  // half the 8 lines it reads
    const __m512i g0 = _mm512_loadu_si512(digits + d);
    const __m512i g1 = kProbes > 1 ? _mm512_loadu_si512(digits + stride + d) : g0;
    for (int j = 0; j < 8; ++j) {
      const __m512i raw = tail ? _mm512_maskz_loadu_epi8(tail, keys[j] + d) : _mm512_loadu_si512(keys[j] + d);
      const __m512i q = _mm512_xor_si512(raw, flip);
      acc[2 * j] = _mm512_dpbusd_epi32(acc[2 * j], q, g0);
      if constexpr (kProbes > 1) acc[2 * j + 1] = _mm512_dpbusd_epi32(acc[2 * j + 1], q, g1);
    }
  };
  int64_t d = 0;
  for (; d + 64 <= dim; d += 64) step(d, 0);
  if (d < dim) step(d, ~0ULL >> (64 - (dim - d)));
  if (spread != nullptr) spread->next = prefetch_next;
  _mm512_storeu_si512(sums, reduce16_epi32(acc));
}

}  // namespace detail
#elif MLLM_INT8_SCREEN == MLLM_SCREEN_AVX2
namespace detail {
// out[i] = the sum of the 8 int32 lanes of v[i], i < 8.
inline __m256i reduce8_epi32(const __m256i* v) {
  const __m256i s01 = _mm256_hadd_epi32(v[0], v[1]), s23 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i s45 = _mm256_hadd_epi32(v[4], v[5]), s67 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i lo = _mm256_hadd_epi32(s01, s23), hi = _mm256_hadd_epi32(s45, s67);  // per 128-bit half
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// acc + v (int32 lanes), added in place: GCC 12 adds into v's register instead and copies the sum
// back to acc's, one copy per accumulator and step of the loop below (6% of its time, four probes).
// "x": the VEX encoding reaches the first 16 vector registers only.
inline __m256i add_into(__m256i acc, __m256i v) {
  asm("vpaddd %1, %0, %0" : "+x"(acc) : "x"(v));
  return acc;
}

// Lane j of dots[r] = sum_d keys[j][d] * digits[r * stride + d] for 8 key rows j and r < kProbes;
// int32, exact (see screen_digit_max). The keys are sign-extended to int16 16 at a time and
// shared by the probes: chunks of 8 / kProbes keys (kProbes rounded up to a power of two) keep
// kProbes * keys = 8 int32 accumulators, so that no register spills. The keys' last partial step
// is copied to a zeroed buffer (AVX2 has no masked load; the digits are zero past dim). The sums
// stay in registers: written to memory in pieces and read back as vectors, they stalled the
// reads (failed store-to-load forwards; a one-probe int8 descend is 6.5% faster without them).
template <int kProbes>
__attribute__((always_inline)) inline void screen_dots(const int8_t* const* keys, const int16_t* digits, int64_t stride,
                                                       int64_t dim, __m256i* dots) {
  constexpr int kChunkKeys = kProbes == 1 ? 8 : kProbes == 2 ? 4 : 2;
  const int64_t whole = dim / 16 * 16;
  __m256i sums[8 / kChunkKeys];  // sums[c / kChunkKeys], lane r * kChunkKeys + j: key c + j, probe r
  for (int c = 0; c < 8; c += kChunkKeys) {
    __m256i acc[8];  // acc[r * kChunkKeys + j]: key c + j, probe r
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_si256();
    auto step = [&](const int8_t* const* rows, int64_t d, int64_t at) {
      auto key = [&](int j) {
        return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + at)));
      };
      // Each key and digit vector is loaded once per step. With one probe, a key is used once:
      // loaded where used (eight of them would not fit the registers beside the accumulators).
      __m256i q[kChunkKeys];
      if constexpr (kProbes > 1)
        for (int j = 0; j < kChunkKeys; ++j) q[j] = key(j);
      for (int r = 0; r < kProbes; ++r) {
        const __m256i g =
            in_register(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(digits + r * stride + d)));
        for (int j = 0; j < kChunkKeys; ++j)
          acc[r * kChunkKeys + j] = add_into(acc[r * kChunkKeys + j], _mm256_madd_epi16(kProbes > 1 ? q[j] : key(j), g));
      }
    };
    for (int64_t d = 0; d < whole; d += 16) step(keys + c, d, d);
    if (whole < dim) {
      alignas(16) int8_t tail[kChunkKeys][16] = {};
      const int8_t* rows[kChunkKeys];
      for (int j = 0; j < kChunkKeys; ++j) {
        std::memcpy(tail[j], keys[c + j] + whole, static_cast<size_t>(dim - whole));
        rows[j] = tail[j];
      }
      step(rows, whole, 0);
    }
    sums[c / kChunkKeys] = reduce8_epi32(acc);
  }
  if constexpr (kChunkKeys == 8) {
    dots[0] = sums[0];
  } else if constexpr (kChunkKeys == 4) {  // sums[i]: [probe 0 | probe 1] of keys 4i .. 4i + 3
    dots[0] = _mm256_permute2x128_si256(sums[0], sums[1], 0x20);
    dots[1] = _mm256_permute2x128_si256(sums[0], sums[1], 0x31);
  } else {  // sums[i]: [probe 0, probe 1 | probe 2, probe 3] of keys 2i, 2i + 1
    // [probe 0 | probe 2] and [probe 1 | probe 3] of keys 0..3 (lo) and 4..7 (hi)
    const __m256i even_lo = _mm256_unpacklo_epi64(sums[0], sums[1]), odd_lo = _mm256_unpackhi_epi64(sums[0], sums[1]);
    const __m256i even_hi = _mm256_unpacklo_epi64(sums[2], sums[3]), odd_hi = _mm256_unpackhi_epi64(sums[2], sums[3]);
    dots[0] = _mm256_permute2x128_si256(even_lo, even_hi, 0x20);
    dots[1] = _mm256_permute2x128_si256(odd_lo, odd_hi, 0x20);
    if constexpr (kProbes > 2) dots[2] = _mm256_permute2x128_si256(even_lo, even_hi, 0x31);
    if constexpr (kProbes > 3) dots[3] = _mm256_permute2x128_si256(odd_lo, odd_hi, 0x31);
  }
}

}  // namespace detail
#endif

class Int8Screen {
 public:
  // Keys bounded per call.
  static constexpr int kKeys = 8;
  // Probes whose digits are dotted with the keys together: two in the 16 int32 lanes of 8 keys
  // (VNNI), four in AVX2's registers.
  static constexpr int kProbeBlock = MLLM_INT8_SCREEN == MLLM_SCREEN_VNNI ? 2 : 4;

  // Rounds the probes [num_probes, dim] (float32, contiguous) of one query row to digits.
  // Returns false, and the screen must not be used, when the screen is not built, a probe holds
  // NaN or infinity, or dim exceeds what int32 sums hold exactly.
  bool prepare(const float* probes, int64_t num_probes, int64_t dim) {
#if MLLM_INT8_SCREEN
    if (dim > 65536 || num_probes < 1) return false;
    log_num_probes_ = static_cast<float>(std::log(static_cast<double>(num_probes)));
    dim_ = dim;
    stride_ = (dim + 63) / 64 * 64;
    const int digit_max = screen_digit_max(dim);
    // The remainder's scale s / 254 must stay far above float32's subnormals, whose absolute
    // rounding errors the bound's relative margins do not cover: a probe whose largest |element|
    // is below 2^-90 * 254 * 127 (about 3e-23) keeps one digit.
    const detail::ProbeStats first = detail::probe_stats(probes, dim);
    two_digits_ = MLLM_INT8_SCREEN == MLLM_SCREEN_VNNI && num_probes == 1 &&
                  first.max_abs / static_cast<float>(digit_max) / 254.0f >= 0x1p-90f;
    digit_rows_ = two_digits_ ? 2 : num_probes;
    const int64_t padded = (digit_rows_ + kProbeBlock - 1) / kProbeBlock * kProbeBlock;
    digits_.assign(padded * stride_, 0);
    // Unused lanes of the last block: A = 0 and slack = -inf give a bound of -inf.
    scale_.assign(padded, 0.0f);
    slack_.assign(padded, -INFINITY);
    correction_.assign(padded, 0);
    const double gamma = float_sum_gamma(dim + 16);  // the float32 dot product's own rounding
    for (int64_t p = 0; p < num_probes; ++p) {
      const float* row = probes + p * dim;
      const detail::ProbeStats stats = p == 0 ? first : detail::probe_stats(row, dim);
      if (!stats.finite) return false;
      const float s = stats.max_abs / static_cast<float>(digit_max);
      const float inv = stats.max_abs > 0 ? static_cast<float>(digit_max) / stats.max_abs : 0.0f;
      ScreenDigit* digits = digits_.data() + p * stride_;
      double err = 0.0, err_bound = 0.0;
      int64_t digit_sum = 0;
      if (two_digits_) {
        // p = s hi + s_lo lo + e: the remainder's digits carry 8 more bits (s_lo = s / 254 maps
        // the remainder t = fl(p - s hi), at most s / 2, onto the digit range), which tightens the
        // bound 254 times. e = fl(t - s_lo lo): each rounding is at most 2^-24 of its result.
        double remainder = 0.0;  // sum |t|
        int64_t lo_sum = 0;
        remainders_.resize(dim);
        detail::round_probe(row, dim, s, inv, digit_max, digits, remainder, digit_sum, remainders_.data());
        detail::round_probe(remainders_.data(), dim, s / 254.0f, inv * 254.0f, digit_max, digits + stride_, err,
                            lo_sum);
        err_bound = (err * (1.0 + 0x1p-23) + remainder * 0x1p-23) * (1.0 + 2.0 * gamma);
        scale_[1] = s / 254.0f;
        correction_[1] = static_cast<int32_t>(128 * lo_sum);
      } else {
        detail::round_probe(row, dim, s, inv, digit_max, digits, err, digit_sum);
        // Each |p - s r| term is within 2^-24 of its float value; the float sums of D non-negative
        // terms are within a relative gamma(D) of the real sums: inflate them.
        err_bound = err * (1.0 + 2.0 * gamma) * (1.0 + 0x1p-23);
      }
      scale_[p] = s;
      // Rounded up to float (the relative 2^-22 exceeds a float rounding).
      const double abs_bound = gamma * stats.abs_sum * (1.0 + 2.0 * gamma);
      slack_[p] = static_cast<float>(kInt8ValueMax * (err_bound + abs_bound) * (1.0 + 0x1p-22));
      // VNNI: the keys enter the integer dot product as q + 128; |128 * sum r| <= 128 * 127 * 65536.
      correction_[p] = MLLM_INT8_SCREEN == MLLM_SCREEN_VNNI ? static_cast<int32_t>(128 * digit_sum) : 0;
    }
    if (two_digits_) slack_[1] = slack_[0];  // the probe's, in both lanes of its pair
    return true;
#else
    (void)probes;
    (void)num_probes;
    (void)dim;
    return false;
#endif
  }

  // Which of the int8 rows keys[j] (scales[j]), j < kKeys, might score at least `threshold` in
  // descend_row's float32 arithmetic (max or logsumexp over the probes): bit j is clear only when
  // the row's score is certainly below it. bounds[j] and lower[j] get bounds of the row's score
  // from above and below (NaN when none is known: rows with a non-finite scale, which are always
  // kept). `spread` (may be null): the key stream's prefetch to issue meanwhile (PrefetchSpread;
  // the AVX2 screen issues it at once). Only after a successful prepare().
  unsigned survivors(const int8_t* const* keys, const float* scales, bool lse, float threshold, float* bounds,
                     float* lower, PrefetchSpread* spread = nullptr) const {
#if MLLM_INT8_SCREEN == MLLM_SCREEN_VNNI
    // Lane 2 j + r: key j, probe r of a block of 2. Per key, the largest s_r <r, q> + slack_r
    // (pos) and -s_r <r, q> + slack_r (neg) over the probes: its bound is k * pos for a scale
    // k >= 0, |k| * neg otherwise. float32, with margins for its roundings (see below).
    __m512 pos = _mm512_set1_ps(-INFINITY), neg = _mm512_set1_ps(-INFINITY);
    __m512 pos_lower = _mm512_set1_ps(-INFINITY), neg_lower = _mm512_set1_ps(-INFINITY);
    alignas(64) int32_t sums[16];
    // The two floats (or int32) of a block's probes at p, in every pair of lanes.
    auto pair_ps = [](const void* p) {
      double both;
      std::memcpy(&both, p, sizeof(both));
      return _mm512_castpd_ps(_mm512_set1_pd(both));
    };
    for (int64_t p0 = 0; p0 < digit_rows_; p0 += kProbeBlock) {
      probe_block_dots(keys, p0, sums, spread);
      const __m512 scale = pair_ps(scale_.data() + p0), slack = pair_ps(slack_.data() + p0);
      const __m512i correction = _mm512_castps_si512(pair_ps(correction_.data() + p0));
      // <r, q> = sums - 128 sum_d r_d: exact in int32 (|<r, q>| <= 127^2 D); A = s <r, q> rounds twice.
      __m512 a = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(sums), correction)));
      __m512 magnitude = _mm512_abs_ps(a);
      if (two_digits_) {  // the pair holds the two digits' parts of the probe's A: add them (a third rounding)
        const __m512 other = detail::permute_ps<_MM_SHUFFLE(2, 3, 0, 1)>(a);
        magnitude = _mm512_add_ps(magnitude, _mm512_abs_ps(other));
        a = _mm512_add_ps(a, other);
      }
      // 2^-20 (|A| + slack), |A| or the sum of its parts' magnitudes, covers those roundings and
      // that of the sums below (cancellation).
      const __m512 margin = _mm512_mul_ps(_mm512_add_ps(magnitude, slack), _mm512_set1_ps(0x1p-20f));
      pos = detail::max_ps(pos, _mm512_add_ps(_mm512_add_ps(slack, a), margin));
      neg = detail::max_ps(neg, _mm512_add_ps(_mm512_sub_ps(slack, a), margin));
      // The lower bounds' padding lanes need -inf from a - slack: their slack becomes +inf.
      const __m512 lower_slack =
          _mm512_mask_blend_ps(_mm512_cmp_ps_mask(slack, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), slack,
                               _mm512_set1_ps(INFINITY));
      const __m512 lower_margin = _mm512_mul_ps(_mm512_add_ps(magnitude, lower_slack), _mm512_set1_ps(0x1p-20f));
      pos_lower = detail::max_ps(pos_lower, _mm512_sub_ps(_mm512_sub_ps(a, lower_slack), lower_margin));
      neg_lower = detail::max_ps(neg_lower,
                                 _mm512_sub_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_add_ps(a, lower_slack)),
                                               lower_margin));
    }
    // Both lanes of a key's pair get the pair's maximum.
    auto pair_max = [](__m512 v) { return detail::max_ps(v, detail::permute_ps<_MM_SHUFFLE(2, 3, 0, 1)>(v)); };
    const __m512 k = detail::permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                                           _mm512_castps256_ps512(_mm256_loadu_ps(scales)));
    const __m512 abs_k = _mm512_abs_ps(k);
    const __mmask16 negative = _mm512_cmp_ps_mask(k, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 bound = _mm512_mul_ps(abs_k, _mm512_mask_blend_ps(negative, pair_max(pos), pair_max(neg)));
    bound = _mm512_fmadd_ps(_mm512_abs_ps(bound), _mm512_set1_ps(float(kScoreBoundRelative)), bound);
    __m512 low = _mm512_mul_ps(abs_k, _mm512_mask_blend_ps(negative, pair_max(pos_lower), pair_max(neg_lower)));
    low = _mm512_fnmadd_ps(_mm512_abs_ps(low), _mm512_set1_ps(float(kScoreBoundRelative)), low);
    if (lse) {
      bound = _mm512_add_ps(bound, _mm512_set1_ps(log_num_probes_));
      bound = _mm512_add_ps(_mm512_fmadd_ps(_mm512_abs_ps(bound), _mm512_set1_ps(float(kLseBoundRelative)), bound),
                            _mm512_set1_ps(float(kLseBoundAbsolute)));
    }
    // No bound for a non-finite scale; kept: not (bound < threshold), NaN included.
    const __mmask16 unbounded = _mm512_cmp_ps_mask(abs_k, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);
    bound = _mm512_mask_blend_ps(unbounded, bound, _mm512_set1_ps(NAN));
    low = _mm512_mask_blend_ps(unbounded, low, _mm512_set1_ps(NAN));
    const unsigned kept = _mm512_cmp_ps_mask(bound, _mm512_set1_ps(threshold), _CMP_NLT_UQ);
    // The even lanes (keys 0..7) to the low half, stored with a mask (GCC 12's 512-to-256-bit
    // cast trips -Wuninitialized, bug 105593).
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
    _mm512_mask_storeu_ps(bounds, 0x00FF, detail::permutexvar_ps(even, bound));
    _mm512_mask_storeu_ps(lower, 0x00FF, detail::permutexvar_ps(even, low));
    unsigned keep = 0;
    for (int j = 0; j < kKeys; ++j) keep |= (kept >> (2 * j) & 1u) << j;
    return keep;
#elif MLLM_INT8_SCREEN == MLLM_SCREEN_AVX2
    // The arithmetic of the VNNI version above, with key j in lane j.
    if (spread != nullptr) spread->finish();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 pos = _mm256_set1_ps(-INFINITY), neg = _mm256_set1_ps(-INFINITY);
    __m256 pos_lower = _mm256_set1_ps(-INFINITY), neg_lower = _mm256_set1_ps(-INFINITY);
    __m256i dots[4];  // lane j of dots[r]: key j, probe p0 + r
    for (int64_t p0 = 0; p0 < digit_rows_; p0 += kProbeBlock) {
      probe_block_dots(keys, p0, dots);
      for (int64_t r = 0; r < std::min<int64_t>(kProbeBlock, digit_rows_ - p0); ++r) {
        const __m256 slack = _mm256_set1_ps(slack_[p0 + r]);
        const __m256 a = _mm256_mul_ps(_mm256_set1_ps(scale_[p0 + r]), _mm256_cvtepi32_ps(dots[r]));
        const __m256 margin = _mm256_mul_ps(_mm256_add_ps(_mm256_andnot_ps(sign, a), slack), _mm256_set1_ps(0x1p-20f));
        pos = _mm256_max_ps(pos, _mm256_add_ps(_mm256_add_ps(slack, a), margin));
        neg = _mm256_max_ps(neg, _mm256_add_ps(_mm256_sub_ps(slack, a), margin));
        pos_lower = _mm256_max_ps(pos_lower, _mm256_sub_ps(_mm256_sub_ps(a, slack), margin));
        neg_lower = _mm256_max_ps(neg_lower, _mm256_sub_ps(_mm256_xor_ps(_mm256_add_ps(a, slack), sign), margin));
      }
    }
    const __m256 k = _mm256_loadu_ps(scales), abs_k = _mm256_andnot_ps(sign, k);
    const __m256 negative = _mm256_cmp_ps(k, _mm256_setzero_ps(), _CMP_LT_OQ);
    __m256 bound = _mm256_mul_ps(abs_k, _mm256_blendv_ps(pos, neg, negative));
    bound = _mm256_fmadd_ps(_mm256_andnot_ps(sign, bound), _mm256_set1_ps(float(kScoreBoundRelative)), bound);
    __m256 low = _mm256_mul_ps(abs_k, _mm256_blendv_ps(pos_lower, neg_lower, negative));
    low = _mm256_fnmadd_ps(_mm256_andnot_ps(sign, low), _mm256_set1_ps(float(kScoreBoundRelative)), low);
    if (lse) {
      bound = _mm256_add_ps(bound, _mm256_set1_ps(log_num_probes_));
      bound = _mm256_add_ps(
          _mm256_fmadd_ps(_mm256_andnot_ps(sign, bound), _mm256_set1_ps(float(kLseBoundRelative)), bound),
          _mm256_set1_ps(float(kLseBoundAbsolute)));
    }
    // No bound for a non-finite scale; kept: not (bound < threshold), NaN included.
    const __m256 unbounded = _mm256_cmp_ps(abs_k, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ);
    bound = _mm256_blendv_ps(bound, _mm256_set1_ps(NAN), unbounded);
    _mm256_storeu_ps(bounds, bound);
    _mm256_storeu_ps(lower, _mm256_blendv_ps(low, _mm256_set1_ps(NAN), unbounded));
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(bound, _mm256_set1_ps(threshold), _CMP_NLT_UQ)));
#else
    (void)keys;
    (void)scales;
    (void)lse;
    (void)threshold;
    for (int j = 0; j < kKeys; ++j) bounds[j] = lower[j] = NAN;
    return (1u << kKeys) - 1;
#endif
  }

 private:
#if MLLM_INT8_SCREEN
  // The dot products of the kKeys rows `keys` with the digits of the block of (up to) kProbeBlock probes
  // from p0, in screen_dots' layout (inlined, so that AVX2's stay in registers).
#if MLLM_INT8_SCREEN == MLLM_SCREEN_AVX2
  using BlockDots = __m256i;
#else
  using BlockDots = int32_t;
#endif
  __attribute__((always_inline)) void probe_block_dots(const int8_t* const* keys, int64_t p0, BlockDots* out,
                                                       PrefetchSpread* spread = nullptr) const {
    const ScreenDigit* digits = digits_.data() + p0 * stride_;
#if MLLM_INT8_SCREEN == MLLM_SCREEN_VNNI
    if (digit_rows_ - p0 >= 2) {
      detail::screen_dots<2>(keys, digits, stride_, dim_, out, spread);
    } else {
      detail::screen_dots<1>(keys, digits, stride_, dim_, out, spread);
    }
#else
    switch (std::min<int64_t>(4, digit_rows_ - p0)) {
      case 4: detail::screen_dots<4>(keys, digits, stride_, dim_, out); break;
      case 3: detail::screen_dots<3>(keys, digits, stride_, dim_, out); break;
      case 2: detail::screen_dots<2>(keys, digits, stride_, dim_, out); break;
      default: detail::screen_dots<1>(keys, digits, stride_, dim_, out); break;
    }
#endif
  }
#endif

  int64_t dim_ = 0, stride_ = 0;
  // VNNI with one probe: two digit rows (the probe's digits and its remainder's, see prepare), in
  // the two lanes of a key that a second probe would take. Else one row per probe.
  bool two_digits_ = false;
  int64_t digit_rows_ = 0;
  float log_num_probes_ = 0;  // the logsumexp of P values is at most their max + log(P)
  std::vector<ScreenDigit> digits_;  // [P padded to whole blocks, stride_]: the probes' digits, zero past dim
  // Per probe (padded to whole blocks): s = max |p| / screen_digit_max(D); the slack
  // 128 * (sum |p - s r| + gamma(D) sum |p|), inflated for its own rounding (-inf for padding);
  // VNNI: 128 * sum_d r_d (the keys enter the integer dot product as q + 128), else 0.
  std::vector<float> scale_, slack_;
  std::vector<int32_t> correction_;
  std::vector<float> remainders_;  // [D] two digits: the probe's remainder after its first digits
};

}  // namespace mllm::cpu
