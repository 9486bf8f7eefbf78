// The CPU implementations of the mllm_kernels operators (schemas in csrc/ops.cpp).
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
                                                  const std::optional<at::Tensor>& mask);
std::tuple<at::Tensor, at::Tensor> score_children_backward(const at::Tensor& grad_scores, const at::Tensor& probes,
                                                           const at::Tensor& keys, const at::Tensor& child_ids,
                                                           const std::string& reduce);

std::tuple<at::Tensor, at::Tensor> descend(const at::Tensor& probes, const at::Tensor& keys,
                                           const at::Tensor& parents, int64_t fanout, int64_t t,
                                           const std::string& reduce, const std::optional<at::Tensor>& mask);
std::vector<at::Tensor> descend_tree(const std::vector<at::Tensor>& probes, const std::vector<at::Tensor>& keys,
                                     int64_t fanout, const std::vector<int64_t>& t, const std::string& reduce,
                                     const std::vector<std::optional<at::Tensor>>& masks);

}  // namespace mllm::cpu
