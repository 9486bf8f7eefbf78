// score_children on the CPU: every child slot of the parents scored against all probes, and
// its backward (gradients of the scores with respect to probes and keys; with int8 keys, with
// respect to probes only).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../common/probe_reduce.h"
#include "../common/quantized.h"
#include "child_scoring.h"
#include "kernels.h"
#include "prefetch_stream.h"
#include "simd.h"

namespace mllm::cpu {
namespace {

// Calls fn(acc_zero) with a zero of the compute type (float or double), so a kernel can be
// instantiated for it.
template <typename Fn>
void with_compute_type(at::ScalarType acc, Fn&& fn) {
  if (acc == at::kDouble) {
    fn(double(0));
  } else {
    fn(float(0));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> score_children(const at::Tensor& probes, const at::Tensor& keys,
                                                  const at::Tensor& parents, int64_t fanout, const std::string& reduce,
                                                  const std::optional<at::Tensor>& mask,
                                                  const std::optional<at::Tensor>& key_scales) {
  const char* op = "score_children";
  check_level(op, probes, keys, mask, key_scales);
  check_at_least_one(op, "fanout", fanout);
  const bool lse = parse_reduce(op, reduce);
  check_parents(op, parents, probes, keys.size(0), fanout);

  const at::ScalarType acc = compute_dtype(probes, keys);
  const at::Tensor probes_c = probes.to(acc).contiguous();
  const at::Tensor keys_c = keys.contiguous();
  const at::Tensor parents_c = parents.contiguous();
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor scales_c = key_scales.has_value() ? key_scales->contiguous() : at::Tensor();
  const int64_t batch = probes.size(0), num_probes = probes.size(1), dim = probes.size(2);
  const int64_t num_parents = parents.size(1), num_nodes = keys.size(0);
  const int64_t num_slots = num_parents * fanout;
  at::Tensor scores = empty_output({batch, num_slots}, probes.options().dtype(acc));
  at::Tensor child_ids = empty_output({batch, num_slots}, parents.options());

  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kChar, keys.scalar_type(), "score_children", [&] {
    using key_t = scalar_t;
    with_compute_type(acc, [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const acc_t* probe_data = probes_c.data_ptr<acc_t>();
      const key_t* key_data = keys_c.data_ptr<key_t>();
      const int64_t* parent_data = parents_c.data_ptr<int64_t>();
      const bool* mask_data = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
      const float* scale_data = scales_c.defined() ? scales_c.data_ptr<float>() : nullptr;
      acc_t* score_data = scores.data_ptr<acc_t>();
      int64_t* id_data = child_ids.data_ptr<int64_t>();
      const int64_t work = batch * num_parents;
      at::parallel_for(0, work, 1, [&](int64_t begin, int64_t end) {
        // Item `begin + k` (query row b, parent j) scores blocks[k]; the slots of its missing
        // children (a short last block, no parent) are empty.
        std::vector<ChildRange> blocks;
        blocks.reserve(end - begin);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t parent = parent_data[item];
          blocks.push_back(parent < 0 ? ChildRange{0, 0} : children_of(parent, fanout, num_nodes));
          const int64_t valid = blocks.back().last - blocks.back().first;
          for (int64_t slot = item * fanout + valid; slot < (item + 1) * fanout; ++slot) {
            score_data[slot] = -INFINITY;
            id_data[slot] = -1;
          }
        }
        std::vector<const acc_t*> probe_rows(num_probes);
        std::vector<acc_t> dots(kMaxDotGroup * num_probes);
        PrefetchSpread spread;
        for_each_chunk(
            key_data, dim * int64_t(sizeof(key_t)), blocks.data(), end - begin, kMaxDotGroup,
            [&](int64_t k, int64_t first, int64_t count) {
              const int64_t item = begin + k, b = item / num_parents;
              // The output slot of a child: [batch, num_parents, fanout], child c of item k at c - blocks[k].first.
              auto slot = [&](int64_t child) { return item * fanout + (child - blocks[k].first); };
              int64_t ids[kMaxDotGroup];
              int num_ids = 0;
              for (int64_t child = first; child < first + count; ++child) {
                if (mask_data == nullptr || mask_data[child]) {
                  ids[num_ids++] = child;
                } else {
                  score_data[slot(child)] = -INFINITY;
                  id_data[slot(child)] = -1;
                }
              }
              if (num_ids == 0) return;
              for (int64_t p = 0; p < num_probes; ++p) probe_rows[p] = probe_data + (b * num_probes + p) * dim;
              multi_dot_keys(probe_rows.data(), num_probes, dim, key_data, ids, num_ids, dots.data(), &spread);
              for (int i = 0; i < num_ids; ++i) {
                score_data[slot(ids[i])] =
                    child_score<key_t>(dots.data() + i * num_probes, num_probes, scale_data, ids[i], lse);
                id_data[slot(ids[i])] = ids[i];
              }
            },
            [&](int64_t first, int64_t count) {
              if (scale_data != nullptr) prefetch_row(scale_data + first, count * int64_t(sizeof(float)));
            },
            &spread);
      });
    });
  });
  return {scores, child_ids};
}

std::tuple<at::Tensor, at::Tensor> score_children_backward(const at::Tensor& grad_scores, const at::Tensor& probes,
                                                           const at::Tensor& keys, const at::Tensor& child_ids,
                                                           const std::string& reduce,
                                                           const std::optional<at::Tensor>& key_scales) {
  const char* op = "score_children_backward";
  const bool lse = parse_reduce(op, reduce);
  check_key_scales(op, keys, key_scales);
  const bool quantized = keys.scalar_type() == at::kChar;
  const at::ScalarType acc = compute_dtype(probes, keys);
  const at::Tensor grad_c = grad_scores.to(acc).contiguous();
  const at::Tensor probes_c = probes.to(acc).contiguous();
  const at::Tensor keys_c = keys.contiguous();
  const at::Tensor ids_c = child_ids.contiguous();
  const at::Tensor scales_c = quantized ? key_scales->contiguous() : at::Tensor();
  const int64_t batch = probes.size(0), num_probes = probes.size(1), dim = probes.size(2);
  const int64_t num_slots = ids_c.size(1), num_nodes = keys.size(0);
  TORCH_CHECK_VALUE(grad_c.sizes() == ids_c.sizes() && ids_c.size(0) == batch, op,
                    ": grad_scores and child_ids must both have shape [B, S]");

  // coef[b, s, p] = d loss / d <probes[b, p], keys[child(b, s)]>
  // int8 keys are not differentiable: no key gradient and no coefficients to keep for it.
  at::Tensor coef = at::zeros({quantized ? 0 : batch, num_slots, num_probes}, probes_c.options());
  at::Tensor grad_probes = at::zeros({batch, num_probes, dim}, probes_c.options());
  at::Tensor grad_keys = at::zeros({quantized ? 0 : num_nodes, dim}, probes_c.options());

  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kChar, keys.scalar_type(), "score_children", [&] {
    using key_t = scalar_t;
    with_compute_type(acc, [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const acc_t* probe_data = probes_c.data_ptr<acc_t>();
      const acc_t* grad_data = grad_c.data_ptr<acc_t>();
      const key_t* key_data = keys_c.data_ptr<key_t>();
      const int64_t* id_data = ids_c.data_ptr<int64_t>();
      acc_t* coef_data = coef.data_ptr<acc_t>();
      acc_t* grad_probe_data = grad_probes.data_ptr<acc_t>();
      acc_t* grad_key_data = grad_keys.data_ptr<acc_t>();
      const float* scale_data = quantized ? scales_c.data_ptr<float>() : nullptr;

      // Per query: recompute the probe scores of each child, turn the incoming gradient into
      // per-probe coefficients, and accumulate the probes' gradient. Rows are independent.
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> dots(num_probes), weights(num_probes);
        for (int64_t b = begin; b < end; ++b) {
          const acc_t* row_probes = probe_data + b * num_probes * dim;
          for (int64_t s = 0; s < num_slots; ++s) {
            const int64_t child = id_data[b * num_slots + s];
            const acc_t grad = grad_data[b * num_slots + s];
            if (child < 0 || grad == acc_t(0)) continue;
            const key_t* key = key_data + child * dim;
            multi_dot(row_probes, num_probes, dim, key, dots.data());
            // int8 keys: d score / d probe = scale * q, so the raw row is added with weight c * scale.
            acc_t row_scale = acc_t(1);
            if constexpr (std::is_same_v<key_t, int8_t>) {
              row_scale = static_cast<acc_t>(scale_data[child]);
              scale_dots(dots.data(), num_probes, row_scale);
            }
            reduce_probes_grad(dots.data(), num_probes, lse, reduce_probes(dots.data(), num_probes, lse),
                               weights.data());
            for (int64_t p = 0; p < num_probes; ++p) {
              const acc_t c = grad * weights[p];
              if constexpr (!std::is_same_v<key_t, int8_t>) coef_data[(b * num_slots + s) * num_probes + p] = c;
              axpy(grad_probe_data + (b * num_probes + p) * dim, c * row_scale, key, dim);
            }
          }
        }
      });

      // Keys' gradient: several slots may share a child, so each thread owns a band of columns
      // and visits every slot: no atomics, and the summation order is fixed (deterministic).
      if (quantized) return;
      at::parallel_for(0, dim, 16, [&](int64_t col_begin, int64_t col_end) {
        for (int64_t b = 0; b < batch; ++b) {
          for (int64_t s = 0; s < num_slots; ++s) {
            const int64_t child = id_data[b * num_slots + s];
            if (child < 0) continue;
            // grad_keys[child] += sum_p coef[b, s, p] * probes[b, p], one pass over the row.
            axpy_tile(grad_key_data + child * dim + col_begin, 1, coef_data + (b * num_slots + s) * num_probes,
                      probe_data + b * num_probes * dim + col_begin, num_probes, col_end - col_begin, dim);
          }
        }
      });
    });
  });
  return {grad_probes.to(probes.scalar_type()), quantized ? grad_keys : grad_keys.to(keys.scalar_type())};
}

}  // namespace mllm::cpu
