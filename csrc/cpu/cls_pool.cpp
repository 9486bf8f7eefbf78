// cls_pool on the CPU: per-chunk, per-head attention pooling with an online softmax (x is read
// once), and its backward, which recomputes the weights from the saved log-sum-exp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../checks.h"
#include "../common/online_softmax.h"
#include "kernels.h"
#include "prefetch_stream.h"
#include "simd.h"

namespace mllm::cpu {
namespace {

// Rows whose logits are computed before the accumulators are rescaled: one rescale per tile,
// and the tile's rows are still in L1 when they are accumulated.
constexpr int64_t kRowTile = 16;

void check_cls_pool_inputs(const char* op, const at::Tensor& x, const at::Tensor& q, const at::Tensor& chunk_offsets,
                           double scale) {
  check_float(op, "x", x);
  check_float(op, "q", q);
  check_dim(op, "x", x, 2, "[N, D]");
  check_dim(op, "q", q, 2, "[H, D]");
  TORCH_CHECK_VALUE(q.size(1) == x.size(1), op, ": q must have D=", x.size(1), " columns like x, got ", q.size(1));
  check_same_device(op, "x", x, "q", q);
  check_same_device(op, "x", x, "chunk_offsets", chunk_offsets);
  check_offsets(op, "chunk_offsets", chunk_offsets, x.size(0));
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be a finite float, got ", scale);
}

template <typename Fn>
void dispatch_x_and_compute(const at::Tensor& x, at::ScalarType acc, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cls_pool", [&] {
    if (acc == at::kDouble) {
      fn(scalar_t(0), double(0));
    } else {
      fn(scalar_t(0), float(0));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cls_pool(const at::Tensor& x, const at::Tensor& q, const at::Tensor& chunk_offsets,
                                            double scale) {
  const char* op = "cls_pool";
  check_cls_pool_inputs(op, x, q, chunk_offsets, scale);
  const at::ScalarType acc = compute_dtype(x, q);
  const at::Tensor x_c = x.contiguous();
  const at::Tensor q_scaled = (q.to(acc) * scale).contiguous();  // logits = <q_scaled, x_i>
  const at::Tensor offsets = chunk_offsets.contiguous();
  const int64_t dim = x.size(1), heads = q.size(0), num_chunks = offsets.numel() - 1;
  at::Tensor pooled = empty_output({num_chunks, heads, dim}, x.options());
  at::Tensor lse = empty_output({num_chunks, heads}, x.options().dtype(acc));

  dispatch_x_and_compute(x, acc, [&](auto x_zero, auto acc_zero) {
    using x_t = decltype(x_zero);
    using acc_t = decltype(acc_zero);
    const x_t* x_data = x_c.data_ptr<x_t>();
    const acc_t* q_data = q_scaled.data_ptr<acc_t>();
    const int64_t* offset_data = offsets.data_ptr<int64_t>();
    x_t* pooled_data = pooled.data_ptr<x_t>();
    acc_t* lse_data = lse.data_ptr<acc_t>();
    const int64_t num_rows = x.size(0);
    const int64_t lead_rows = std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(dim * int64_t(sizeof(x_t)), 1));
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> logits(kRowTile * heads), weights(heads * kRowTile), accum(heads * dim);
      std::vector<OnlineSoftmax<acc_t>> softmax(heads);
      for (int64_t c = begin; c < end; ++c) {
        std::fill(accum.begin(), accum.end(), acc_t(0));
        std::fill(softmax.begin(), softmax.end(), OnlineSoftmax<acc_t>());
        for (int64_t tile = offset_data[c]; tile < offset_data[c + 1]; tile += kRowTile) {
          const int64_t rows = std::min(kRowTile, offset_data[c + 1] - tile);
          const x_t* x_tile = x_data + tile * dim;
          // The logits kMaxDotGroup rows at a time (a tile of dot products keeps the FMA units
          // busy; a row alone against one to four heads waits on each FMA's latency), with the
          // prefetch of the rows kPrefetchBytes ahead spread over them (PrefetchSpread): with the
          // hardware prefetchers alone, one head read x at about half the sequential rate.
          for (int64_t r0 = 0; r0 < rows; r0 += kMaxDotGroup) {
            const int64_t group = std::min<int64_t>(kMaxDotGroup, rows - r0);
            const x_t* group_rows[kMaxDotGroup];
            acc_t* group_logits[kMaxDotGroup];
            for (int64_t i = 0; i < group; ++i) {
              group_rows[i] = x_tile + (r0 + i) * dim;
              group_logits[i] = logits.data() + (r0 + i) * heads;
            }
            const int64_t ahead_first = std::min(num_rows, tile + r0 + lead_rows);
            const int64_t ahead_last = std::min(num_rows, tile + r0 + group + lead_rows);
            PrefetchSpread spread{reinterpret_cast<const char*>(x_data + ahead_first * dim),
                                  reinterpret_cast<const char*>(x_data + ahead_last * dim)};
            multi_dot_many(ContiguousRows<acc_t>{q_data, dim}, heads, dim, group_rows, group, group_logits, &spread);
            spread.finish();
          }
          for (int64_t h = 0; h < heads; ++h) {
            acc_t tile_max = -INFINITY;
            for (int64_t r = 0; r < rows; ++r) tile_max = std::max(tile_max, logits[r * heads + h]);
            const acc_t factor = softmax[h].rescale_to(tile_max);
            acc_t* acc_row = accum.data() + h * dim;
            if (factor != acc_t(1))
              for (int64_t d = 0; d < dim; ++d) acc_row[d] *= factor;
            for (int64_t r = 0; r < rows; ++r) weights[h * rows + r] = softmax[h].weigh(logits[r * heads + h]);
          }
          // Every head's accumulator from the tile's rows, each row converted once for all heads.
          axpy_tile(accum.data(), heads, weights.data(), x_tile, rows, dim, dim);
        }
        for (int64_t h = 0; h < heads; ++h) {
          const acc_t sum = softmax[h].sum;
          const acc_t inv = sum > 0 ? acc_t(1) / sum : acc_t(0);
          x_t* out = pooled_data + (c * heads + h) * dim;
          const acc_t* acc_row = accum.data() + h * dim;
          store_scaled(out, acc_row, inv, dim);
          lse_data[c * heads + h] = softmax[h].log_sum_exp();
        }
      }
    });
  });
  return {pooled, lse};
}

std::tuple<at::Tensor, at::Tensor> cls_pool_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                                                     const at::Tensor& x, const at::Tensor& q,
                                                     const at::Tensor& chunk_offsets, const at::Tensor& out,
                                                     const at::Tensor& lse, double scale) {
  const char* op = "cls_pool_backward";
  check_cls_pool_inputs(op, x, q, chunk_offsets, scale);
  const at::ScalarType acc = compute_dtype(x, q);
  const at::Tensor x_c = x.contiguous();
  const at::Tensor q_c = q.to(acc).contiguous();
  const at::Tensor offsets = chunk_offsets.contiguous();
  const int64_t dim = x.size(1), heads = q.size(0), num_chunks = offsets.numel() - 1, num_rows = x.size(0);
  const at::Tensor grad_c = grad_out.to(acc).contiguous();
  // delta[c, h] = <grad_out[c, h], out[c, h]>: the softmax backward's correction term.
  at::Tensor delta = (grad_c * out.to(acc)).sum(-1);
  if (grad_lse.has_value()) delta = delta - grad_lse->to(acc);
  delta = delta.contiguous();
  const at::Tensor lse_c = lse.to(acc).contiguous();

  at::Tensor grad_x = empty_output({num_rows, dim}, x.options());
  // Rows outside every chunk do not reach the output.
  const int64_t first_row = offsets.data_ptr<int64_t>()[0];
  const int64_t last_row = offsets.data_ptr<int64_t>()[num_chunks];
  grad_x.narrow(0, 0, first_row).zero_();
  grad_x.narrow(0, last_row, num_rows - last_row).zero_();
  const int64_t num_threads = at::get_num_threads();
  at::Tensor grad_q_parts = at::zeros({num_threads, heads, dim}, q_c.options());

  dispatch_x_and_compute(x, acc, [&](auto x_zero, auto acc_zero) {
    using x_t = decltype(x_zero);
    using acc_t = decltype(acc_zero);
    const x_t* x_data = x_c.data_ptr<x_t>();
    const acc_t* q_data = q_c.data_ptr<acc_t>();
    const acc_t* grad_data = grad_c.data_ptr<acc_t>();
    const acc_t* delta_data = delta.data_ptr<acc_t>();
    const acc_t* lse_data = lse_c.data_ptr<acc_t>();
    const int64_t* offset_data = offsets.data_ptr<int64_t>();
    x_t* grad_x_data = grad_x.data_ptr<x_t>();
    acc_t* grad_q_data = grad_q_parts.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scale);
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      acc_t* grad_q_local = grad_q_data + at::get_thread_num() * heads * dim;
      // rows_2h = [scale * q; grad_out[c]]: one pass over x_i gives both dot products.
      std::vector<acc_t> rows_2h(2 * heads * dim), dots(2 * heads), grad_row(dim), row_weights(2 * heads);
      std::vector<acc_t> q_weights(heads * kRowTile);  // [heads, rows of a tile]: ds * scale
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < dim; ++d) rows_2h[h * dim + d] = s * q_data[h * dim + d];
      for (int64_t c = begin; c < end; ++c) {
        std::copy(grad_data + c * heads * dim, grad_data + (c + 1) * heads * dim, rows_2h.begin() + heads * dim);
        for (int64_t tile = offset_data[c]; tile < offset_data[c + 1]; tile += kRowTile) {
          const int64_t rows = std::min(kRowTile, offset_data[c + 1] - tile);
          for (int64_t r = 0; r < rows; ++r) {
            const x_t* x_row = x_data + (tile + r) * dim;
            multi_dot_split(rows_2h.data(), 2 * heads, dim, x_row, dots.data());
            for (int64_t h = 0; h < heads; ++h) {
              const acc_t p = std::exp(dots[h] - lse_data[c * heads + h]);
              const acc_t ds = p * (dots[heads + h] - delta_data[c * heads + h]);
              row_weights[h] = ds;          // ds * scale * q[h]
              row_weights[heads + h] = p;   // p * grad_out[c, h]
              q_weights[h * rows + r] = ds * s;
            }
            // grad_x_i = sum_h ds_h * scale * q[h] + p_h * grad_out[c, h], in one pass.
            std::fill(grad_row.begin(), grad_row.end(), acc_t(0));
            axpy_tile(grad_row.data(), 1, row_weights.data(), rows_2h.data(), 2 * heads, dim, dim);
            x_t* grad_x_row = grad_x_data + (tile + r) * dim;
            store_scaled(grad_x_row, grad_row.data(), acc_t(1), dim);
          }
          // grad_q[h] += sum_r ds_r,h * scale * x_r over the tile, every head in one pass.
          axpy_tile(grad_q_local, heads, q_weights.data(), x_data + tile * dim, rows, dim, dim);
        }
      }
    });
  });
  return {grad_x, grad_q_parts.sum(0).to(q.scalar_type())};
}

}  // namespace mllm::cpu
