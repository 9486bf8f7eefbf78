// The CPU implementations of the mllm_kernels operators (schemas in csrc/ops.cpp).
//
// score_children, descend and descend_tree take keys in float32, float16, bfloat16, float64, or
// int8 with one float32 scale per row (key_scales; common/quantized.h has the score semantics).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace mllm::cpu {

std::tuple<at::Tensor, at::Tensor> chunk_offsets(const at::Tensor& seg_offsets, int64_t chunk_size);

std::tuple<at::Tensor, at::Tensor> cls_pool(const at::Tensor& x, const at::Tensor& q,
                                            const at::Tensor& chunk_offsets, double scale);
std::tuple<at::Tensor, at::Tensor> cls_pool_backward(const at::Tensor& grad_out,
                                                     const std::optional<at::Tensor>& grad_lse,
                                                     const at::Tensor& x, const at::Tensor& q,
                                                     const at::Tensor& chunk_offsets, const at::Tensor& out,
                                                     const at::Tensor& lse, double scale);

std::tuple<at::Tensor, at::Tensor> score_children(const at::Tensor& probes, const at::Tensor& keys,
                                                  const at::Tensor& parents, int64_t fanout,
                                                  const std::string& reduce,
                                                  const std::optional<at::Tensor>& mask,
                                                  const std::optional<at::Tensor>& key_scales);
// With int8 keys the keys get no gradient: grad_keys is an empty [0, D] tensor.
std::tuple<at::Tensor, at::Tensor> score_children_backward(const at::Tensor& grad_scores, const at::Tensor& probes,
                                                           const at::Tensor& keys, const at::Tensor& child_ids,
                                                           const std::string& reduce,
                                                           const std::optional<at::Tensor>& key_scales);

std::tuple<at::Tensor, at::Tensor> descend(const at::Tensor& probes, const at::Tensor& keys,
                                           const at::Tensor& parents, int64_t fanout, int64_t t,
                                           const std::string& reduce, const std::optional<at::Tensor>& mask,
                                           const std::optional<at::Tensor>& key_scales);
std::vector<at::Tensor> descend_tree(const std::vector<at::Tensor>& probes, const std::vector<at::Tensor>& keys,
                                     int64_t fanout, const std::vector<int64_t>& t, const std::string& reduce,
                                     const std::vector<std::optional<at::Tensor>>& masks,
                                     const std::optional<std::vector<std::optional<at::Tensor>>>& key_scales);

}  // namespace mllm::cpu
