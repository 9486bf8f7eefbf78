// Vectorised inner loops of the CPU kernels: several dot products against one row read once,
// and a scaled row added to an accumulator. Half-precision rows are widened to float32 in
// registers (F16C / AVX-512 conversions), int8 rows (quantised keys) sign-extended to int32 and
// converted to float32 (exact); accumulation is float32 (or float64 for float64).
//
// The SIMD paths are chosen at compile time from the target flags (setup.py builds with
// -march=native unless MLLM_CPU_ARCH says otherwise); every other case uses the scalar loop.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "prefetch_stream.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace mllm::cpu {

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__AVX512F__) && defined(__AVX512BW__)
#define MLLM_SIMD_WIDTH 16
using vfloat = __m512;
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vset1(float v) { return _mm512_set1_ps(v); }
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vfloat vload(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline vfloat vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline void vstore(c10::Half* p, vfloat v) {  // round to nearest even, as c10::Half
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline uint32_t vat_least_mask(vfloat a, vfloat b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
inline __m256 fold256(vfloat v) {
  // Masked extracts: GCC 12's plain extract and cast pass an undefined vector, which trips
  // -Wuninitialized once inlined (GCC bug 105593).
  const __m512d wide = _mm512_castps_pd(v);
  const __m256d low = _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, wide, 0);
  const __m256d high = _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, wide, 1);
  return _mm256_add_ps(_mm256_castpd_ps(low), _mm256_castpd_ps(high));
}
#elif (defined(__x86_64__) || defined(_M_X64)) && defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define MLLM_SIMD_WIDTH 8
using vfloat = __m256;
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vset1(float v) { return _mm256_set1_ps(v); }
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat vload(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vfloat vload(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline vfloat vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline void vstore(c10::Half* p, vfloat v) {  // round to nearest even, as c10::Half
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline uint32_t vat_least_mask(vfloat a, vfloat b) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ)));
}
inline __m256 fold256(vfloat v) { return v; }
#else
#define MLLM_SIMD_WIDTH 0
#endif

#if defined(__x86_64__) || defined(_M_X64)
// Keeps the vector `v` in a register: stops the compiler from folding the load that produced it
// into each instruction that uses it. A tile's row vector feeds several FMAs (or integer
// multiply-adds); folded, it is loaded once per use, and the loads (two 256-bit ones per cycle on
// Zen 4), not the arithmetic, bound the tile.
template <typename Vector>
inline Vector in_register(Vector v) {
  asm("" : "+v"(v));
  return v;
}
#endif

#if MLLM_SIMD_WIDTH
// out[0..4) = horizontal sums of four vectors, with shared shuffles (a transposed reduction).
inline void vsum4(const vfloat* v, float* out) {
  const __m256 ab = _mm256_hadd_ps(fold256(v[0]), fold256(v[1]));
  const __m256 cd = _mm256_hadd_ps(fold256(v[2]), fold256(v[3]));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit lane: a, b, c, d partial sums
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}

// The horizontal sum of one vector, adding its lanes in vsum4's order (so a dot product gets the
// same bits whether it is reduced alone or in a group of four).
inline float vsum(vfloat v) {
  const __m256 a = fold256(v);
  const __m256 pairs = _mm256_hadd_ps(a, a);
  const __m256 quads = _mm256_hadd_ps(pairs, pairs);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1)));
}
#endif

// Calls fn(std::integral_constant<int, n>{}) for a run-time n in [1, kMax] (clamped), so that the
// loops over n inside fn are unrolled and their vectors kept in registers.
template <int kMax, typename Fn>
inline void with_count(int64_t n, Fn&& fn) {
  if constexpr (kMax <= 1) {
    fn(std::integral_constant<int, 1>{});
  } else if (n >= kMax) {
    fn(std::integral_constant<int, kMax>{});
  } else {
    with_count<kMax - 1>(n, fn);
  }
}

#if MLLM_SIMD_WIDTH
namespace detail {
// out[x][r] = <rows[r][:dim], xs[x]> for r < kRows (up to four) and x < kX, each dot product over kS
// accumulators: each load of a row feeds every x, each load (and conversion) of an x every row.
// Two orders of the same FMAs: with two or three rows and more xs, the row vectors stay in
// registers and each x passes through one; otherwise the xs stay and each row passes through (for
// one row the other order measured 2.7x slower). Either way the accumulators (at most 12) and
// what stays take at most 15 of the 16 vector registers of AVX2, plus one for what passes.
// With kS = 1 a dot product's bits do not depend on the tile it is in: it has one accumulator,
// reduced in vsum4's lane order (the descent groups rows and xs as the work comes, and exact ties
// must stay ties).
// With `spread`, each step of the loop over dim also prefetches its next line (PrefetchSpread).
template <int kRows, int kX, int kS, typename x_t>
inline void dot_tile(const float* const* rows, int64_t dim, const x_t* const* xs, float* const* out,
                     PrefetchSpread* spread) {
  constexpr int W = MLLM_SIMD_WIDTH;
  constexpr bool kRowsStay = kRows > 1 && kRows < kX;
  static_assert(kRows * kX * kS <= 12 && kRows * kX * kS + (kRowsStay ? kRows : kX) + 1 <= 16,
                "the tile must fit the registers");
  vfloat acc[kX][kRows][kS];
  for (int x = 0; x < kX; ++x)
    for (int r = 0; r < kRows; ++r)
      for (int u = 0; u < kS; ++u) acc[x][r][u] = vzero();
  // A vector that feeds several FMAs is loaded once (in_register): folded, the compiler would load
  // it again for each (a float32 x, a row); one that feeds one FMA is better folded into it.
  auto load_x = [&](int x, int64_t at) {
    vfloat v = vload(xs[x] + at);
    if constexpr (kRows > 1 && std::is_same_v<x_t, float>) v = in_register(v);
    return v;
  };
  const char* prefetch_next = spread != nullptr ? spread->next : nullptr;
  const char* const prefetch_end = spread != nullptr ? spread->end : nullptr;
  int64_t d = 0;
  for (; d + kS * W <= dim; d += kS * W)
    for (int u = 0; u < kS; ++u) {
      prefetch_next = prefetch_lines(prefetch_next, prefetch_end, 1);
      if constexpr (kRowsStay) {
        vfloat row[kRows];
        for (int r = 0; r < kRows; ++r) row[r] = in_register(vload(rows[r] + d + u * W));
        for (int x = 0; x < kX; ++x) {
          const vfloat xv = load_x(x, d + u * W);
          for (int r = 0; r < kRows; ++r) acc[x][r][u] = vfma(row[r], xv, acc[x][r][u]);
        }
      } else {
        vfloat xv[kX];
        for (int x = 0; x < kX; ++x) xv[x] = load_x(x, d + u * W);
        for (int r = 0; r < kRows; ++r) {
          vfloat row = vload(rows[r] + d + u * W);
          if constexpr (kX > 1) row = in_register(row);
          for (int x = 0; x < kX; ++x) acc[x][r][u] = vfma(row, xv[x], acc[x][r][u]);
        }
      }
    }
  if (spread != nullptr) spread->next = prefetch_next;
  for (; d + W <= dim; d += W)
    for (int x = 0; x < kX; ++x) {
      const vfloat xv = vload(xs[x] + d);
      for (int r = 0; r < kRows; ++r) acc[x][r][0] = vfma(vload(rows[r] + d), xv, acc[x][r][0]);
    }
  for (int x = 0; x < kX; ++x)
    for (int r = 0; r < kRows; ++r)
      for (int u = 1; u < kS; ++u) acc[x][r][0] = vadd(acc[x][r][0], acc[x][r][u]);
  // The horizontal sums four at a time (vsum4), the rest one by one (vsum): the same bits.
  if constexpr (kRows == 4) {
    for (int x = 0; x < kX; ++x) {
      const vfloat column[4] = {acc[x][0][0], acc[x][1][0], acc[x][2][0], acc[x][3][0]};
      vsum4(column, out[x]);
    }
  } else {
    constexpr int kSums = kX * kRows;
    int i = 0;
    for (; i + 4 <= kSums; i += 4) {
      const vfloat four[4] = {acc[i / kRows][i % kRows][0], acc[(i + 1) / kRows][(i + 1) % kRows][0],
                              acc[(i + 2) / kRows][(i + 2) % kRows][0], acc[(i + 3) / kRows][(i + 3) % kRows][0]};
      float total[4];
      vsum4(four, total);
      for (int j = 0; j < 4; ++j) out[(i + j) / kRows][(i + j) % kRows] = total[j];
    }
    for (; i < kSums; ++i) out[i / kRows][i % kRows] = vsum(acc[i / kRows][i % kRows][0]);
  }
  for (int x = 0; x < kX; ++x)
    for (int64_t e = d; e < dim; ++e)
      for (int r = 0; r < kRows; ++r) out[x][r] += rows[r][e] * static_cast<float>(xs[x][e]);
}

// The most xs a tile of kRows rows scores in one pass. An FMA has 4 cycles of latency and Zen 4
// (the benchmarks' machine) issues two per cycle, so a tile needs about 8 independent accumulators
// (kRows * kX) to keep the FMA units busy: one row takes six xs and two rows six (the rows stay in
// registers), four rows three (12 FMAs per 7 loads, against 8 per 6 with two xs: 8% faster for
// four probes); three rows take three (nine accumulators; four would not fit with the xs).
template <int kRows>
constexpr int kTileXs = kRows <= 2 ? 6 : 3;

// Every row against kX xs, tiling the rows four at a time; a tile whose rows cannot take all kX
// xs at once takes them in two halves. kSplit (with kX = 1 only): tiles of one or two rows split
// each dot product over 4 or 2 accumulators, to keep 4 FMAs in flight.
template <int kX, bool kSplit, typename x_t, typename Rows>
inline void multi_dot_simd(const Rows& rows, int64_t num_rows, int64_t dim, const x_t* const* xs, float* const* out,
                           PrefetchSpread* spread = nullptr) {
  static_assert(!kSplit || kX == 1, "split accumulators are for one x");
  int64_t p = 0;
  auto tile = [&](auto rows_in_tile) {
    constexpr int R = decltype(rows_in_tile)::value;
    constexpr int S = kSplit ? (R == 1 ? 4 : R == 2 ? 2 : 1) : 1;
    const float* tile_rows[R];
    for (int r = 0; r < R; ++r) tile_rows[r] = rows(p + r);
    float* out_p[kX];
    for (int x = 0; x < kX; ++x) out_p[x] = out[x] + p;
    if constexpr (kX > kTileXs<R>) {
      constexpr int kFirst = (kX + 1) / 2;
      dot_tile<R, kFirst, S>(tile_rows, dim, xs, out_p, spread);
      dot_tile<R, kX - kFirst, S>(tile_rows, dim, xs + kFirst, out_p + kFirst, spread);
    } else {
      dot_tile<R, kX, S>(tile_rows, dim, xs, out_p, spread);
    }
    p += R;
  };
  while (p + 4 <= num_rows) tile(std::integral_constant<int, 4>{});
  switch (num_rows - p) {
    case 3: tile(std::integral_constant<int, 3>{}); break;
    case 2: tile(std::integral_constant<int, 2>{}); break;
    case 1: tile(std::integral_constant<int, 1>{}); break;
    default: break;
  }
}
}  // namespace detail

#endif

// Where the rows of multi_dot_many are: rows(p) is row p's first element.
template <typename T>
struct ContiguousRows {  // [num_rows, dim], row after row
  const T* base;
  int64_t dim;
  const T* operator()(int64_t p) const { return base + p * dim; }
};
template <typename T>
struct GatheredRows {  // anywhere: one pointer per row
  const T* const* rows;
  const T* operator()(int64_t p) const { return rows[p]; }
};

// Whether multi_dot has a SIMD path for keys of type x_t accumulated in acc_t.
template <typename acc_t, typename x_t>
constexpr bool kSimdDot = MLLM_SIMD_WIDTH && std::is_same_v<acc_t, float> && !std::is_same_v<x_t, double>;

// The most vectors multi_dot_many scores in one pass over the rows.
constexpr int kMaxDotGroup = 6;

// outs[x][p] = <rows(p)[:dim], xs[x]> for p < num_rows and x < num_xs: the rows are read once per
// group of up to kMaxDotGroup xs, and each x once per tile of rows. A dot product gets the same
// bits whatever num_xs, its place among the xs and where its row is. rows: ContiguousRows or
// GatheredRows of acc_t. `spread`: see PrefetchSpread (the SIMD paths issue it).
template <typename acc_t, typename x_t, typename Rows>
inline void multi_dot_many(const Rows& rows, int64_t num_rows, int64_t dim, const x_t* const* xs, int64_t num_xs,
                           acc_t* const* outs, PrefetchSpread* spread = nullptr) {
#if MLLM_SIMD_WIDTH
  if constexpr (kSimdDot<acc_t, x_t>) {
    for (int64_t x = 0; x < num_xs; x += kMaxDotGroup)
      with_count<kMaxDotGroup>(num_xs - x, [&](auto xs_in_group) {
        detail::multi_dot_simd<decltype(xs_in_group)::value, false>(rows, num_rows, dim, xs + x, outs + x, spread);
      });
    return;
  }
#endif
  if (spread != nullptr) spread->finish();
  for (int64_t x = 0; x < num_xs; ++x)
    for (int64_t p = 0; p < num_rows; ++p) {
      acc_t sum = 0;
      const acc_t* row = rows(p);
      for (int64_t d = 0; d < dim; ++d) sum += row[d] * static_cast<acc_t>(xs[x][d]);
      outs[x][p] = sum;
    }
}

// out[p] = <rows[p, :], x> for p < num_rows, reading x once. rows: [num_rows, dim] contiguous.
template <typename acc_t, typename x_t>
inline void multi_dot(const acc_t* rows, int64_t num_rows, int64_t dim, const x_t* x, acc_t* out) {
#if MLLM_SIMD_WIDTH
  // Straight to the one-x tiles: through multi_dot_many, the groups of several xs it can never
  // take here would be compiled too (and trip -Warray-bounds on &x).
  if constexpr (kSimdDot<acc_t, x_t>) {
    detail::multi_dot_simd<1, false>(ContiguousRows<float>{rows, dim}, num_rows, dim, &x, &out);
    return;
  }
#endif
  multi_dot_many(ContiguousRows<acc_t>{rows, dim}, num_rows, dim, &x, 1, &out);
}

// dots[i * num_rows + p] = <rows[p][:dim], keys[ids[i], :]> for i < num_ids (at most kMaxDotGroup):
// multi_dot_many over rows `ids` of a [N, dim] key matrix. rows: num_rows pointers, anywhere.
template <typename acc_t, typename key_t>
inline void multi_dot_keys(const acc_t* const* rows, int64_t num_rows, int64_t dim, const key_t* keys,
                           const int64_t* ids, int num_ids, acc_t* dots, PrefetchSpread* spread = nullptr) {
  const key_t* key_rows[kMaxDotGroup];
  acc_t* outs[kMaxDotGroup];
  for (int i = 0; i < num_ids; ++i) {
    key_rows[i] = keys + ids[i] * dim;
    outs[i] = dots + i * num_rows;
  }
  multi_dot_many(GatheredRows<acc_t>{rows}, num_rows, dim, key_rows, num_ids, outs, spread);
}

// out[p] = <rows[p, :], x> for p < num_rows like multi_dot, with each dot product split over
// several accumulators when the rows are few: faster for one x at a time (a stream of xs read in
// order), but its bits differ from multi_dot's, so the descent (whose scores must tie exactly)
// does not use it.
template <typename acc_t, typename x_t>
inline void multi_dot_split(const acc_t* rows, int64_t num_rows, int64_t dim, const x_t* x, acc_t* out) {
#if MLLM_SIMD_WIDTH
  if constexpr (kSimdDot<acc_t, x_t>)
    return detail::multi_dot_simd<1, true>(ContiguousRows<float>{rows, dim}, num_rows, dim, &x, &out);
#endif
  multi_dot(rows, num_rows, dim, x, out);
}

// The most values at_least_mask compares in one call.
constexpr int64_t kMaskBits = 32;

// Bit i set when values[i] >= bounds[i], for i < n <= kMaskBits (a NaN value is never at least its
// bound).
template <typename acc_t>
inline uint32_t at_least_mask(const acc_t* values, const acc_t* bounds, int64_t n) {
  uint32_t mask = 0;
  int64_t i = 0;
#if MLLM_SIMD_WIDTH
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; i + MLLM_SIMD_WIDTH <= n; i += MLLM_SIMD_WIDTH)
      mask |= vat_least_mask(vload(values + i), vload(bounds + i)) << i;
  }
#endif
  for (; i < n; ++i) mask |= static_cast<uint32_t>(values[i] >= bounds[i]) << i;
  return mask;
}

// The most accumulators axpy_tile updates in one pass over the rows.
constexpr int kMaxAxpyGroup = 8;

// acc[a * dim + d] += sum_r weights[a * num_rows + r] * x[r * x_stride + d] for a < num_acc, d < dim
// (acc: [num_acc, dim] contiguous, weights: [num_acc, num_rows], x: num_rows rows x_stride elements
// apart): each x vector is loaded (and converted) once for up to kMaxAxpyGroup accumulators, and
// each accumulator vector loaded and stored once per call. The rows are added in order, one FMA
// each, as axpy adds them called row by row.
template <typename acc_t, typename x_t>
inline void axpy_tile(acc_t* acc, int64_t num_acc, const acc_t* weights, const x_t* x, int64_t num_rows, int64_t dim,
                      int64_t x_stride) {
  for (int64_t a0 = 0; a0 < num_acc; a0 += kMaxAxpyGroup) {
    const int64_t group = std::min<int64_t>(kMaxAxpyGroup, num_acc - a0);
    acc_t* acc_group = acc + a0 * dim;
    const acc_t* weight_group = weights + a0 * num_rows;
    int64_t d = 0;
#if MLLM_SIMD_WIDTH
    if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<x_t, double>) {
      with_count<kMaxAxpyGroup>(group, [&](auto group_size) {
        constexpr int G = decltype(group_size)::value;
        for (; d + MLLM_SIMD_WIDTH <= dim; d += MLLM_SIMD_WIDTH) {
          vfloat sum[G];
          for (int g = 0; g < G; ++g) sum[g] = vload(acc_group + g * dim + d);
          for (int64_t r = 0; r < num_rows; ++r) {
            const vfloat xv = vload(x + r * x_stride + d);
            for (int g = 0; g < G; ++g) sum[g] = vfma(vset1(weight_group[g * num_rows + r]), xv, sum[g]);
          }
          for (int g = 0; g < G; ++g) vstore(acc_group + g * dim + d, sum[g]);
        }
      });
    }
#endif
    for (int64_t g = 0; g < group; ++g)
      for (int64_t e = d; e < dim; ++e) {
        acc_t sum = acc_group[g * dim + e];
        for (int64_t r = 0; r < num_rows; ++r)
          sum += weight_group[g * num_rows + r] * static_cast<acc_t>(x[r * x_stride + e]);
        acc_group[g * dim + e] = sum;
      }
  }
}

// out[d] = x_t(in[d] * scale) for d < n: float32 to float16 a vector at a time (F16C / AVX-512,
// round to nearest even like c10::Half), other types one element at a time.
template <typename x_t, typename acc_t>
inline void store_scaled(x_t* out, const acc_t* in, acc_t scale, int64_t n) {
  int64_t d = 0;
#if MLLM_SIMD_WIDTH
  if constexpr (std::is_same_v<x_t, c10::Half> && std::is_same_v<acc_t, float>)
    for (; d + MLLM_SIMD_WIDTH <= n; d += MLLM_SIMD_WIDTH) vstore(out + d, vmul(vload(in + d), vset1(scale)));
#endif
  for (; d < n; ++d) out[d] = static_cast<x_t>(in[d] * scale);
}

// acc[d] += weight * x[d].
template <typename acc_t, typename x_t>
inline void axpy(acc_t* acc, acc_t weight, const x_t* x, int64_t dim) {
  axpy_tile(acc, 1, &weight, x, 1, dim, dim);
}

}  // namespace mllm::cpu
