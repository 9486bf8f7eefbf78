#include "checks.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>

namespace mllm {

void check_float(const char* op, const std::string& name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
}

void check_int64(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
}

void check_dim(const char* op, const std::string& name, const at::Tensor& t, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_same_device(const char* op, const std::string& name_a, const at::Tensor& a,
                       const std::string& name_b, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": all tensors must be on one device, ", name_a, " is on ",
                    a.device(), " and ", name_b, " on ", b.device());
}

void check_at_least_one(const char* op, const char* name, int64_t value) {
  TORCH_CHECK_VALUE(value >= 1, op, ": ", name, " must be >= 1, got ", value);
}

bool parse_reduce(const char* op, const std::string& reduce) {
  TORCH_CHECK_VALUE(reduce == "max" || reduce == "lse", op, ": reduce must be 'max' or 'lse', got '", reduce, "'");
  return reduce == "lse";
}

void check_offsets(const char* op, const char* name, const at::Tensor& offsets, int64_t num_rows) {
  check_int64(op, name, offsets);
  check_dim(op, name, offsets, 1, "[K + 1]");
  TORCH_CHECK_VALUE(offsets.numel() >= 1, op, ": ", name, " must hold at least one offset");
  const at::Tensor host = offsets.contiguous().cpu();
  const int64_t* data = host.data_ptr<int64_t>();
  for (int64_t i = 1; i < host.numel(); ++i) {
    TORCH_CHECK_VALUE(data[i] >= data[i - 1], op, ": ", name, " must be non-decreasing, but ", name, "[", i,
                      "] = ", data[i], " < ", name, "[", i - 1, "] = ", data[i - 1]);
  }
  const int64_t low = data[0], high = data[host.numel() - 1];
  TORCH_CHECK_INDEX(low >= 0 && (num_rows < 0 || high <= num_rows), op, ": ", name, " must be >= 0",
                    (num_rows < 0 ? std::string() : " and <= " + std::to_string(num_rows)), ", got values in [",
                    low, ", ", high, "]");
}

void check_key_dtype(const char* op, const std::string& name, const at::Tensor& keys,
                     const std::string& scales_name) {
  const auto dtype = keys.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble ||
                       dtype == at::kChar,
                   op, ": ", name, " must be float32, float16, bfloat16, float64 or int8 (with ", scales_name,
                   "), got ", dtype);
}

void check_key_scales(const char* op, const at::Tensor& keys, const std::optional<at::Tensor>& key_scales,
                      const std::string& keys_name, const std::string& scales_name) {
  check_key_dtype(op, keys_name, keys, scales_name);
  const auto dtype = keys.scalar_type();
  if (dtype != at::kChar) {
    TORCH_CHECK_VALUE(!key_scales.has_value(), op, ": ", scales_name, " must be None unless ", keys_name,
                      " are int8, got ", keys_name, " of dtype ", dtype);
    return;
  }
  TORCH_CHECK_VALUE(key_scales.has_value(), op, ": ", scales_name, " is required with int8 ", keys_name,
                    " (one float32 scale per row, as returned by quantize_keys)");
  TORCH_CHECK_TYPE(key_scales->scalar_type() == at::kFloat, op, ": ", scales_name, " must be float32, got ",
                   key_scales->scalar_type());
  TORCH_CHECK_VALUE(key_scales->dim() == 1 && key_scales->size(0) == keys.size(0), op, ": ", scales_name,
                    " must have shape [", keys.size(0), "] (one scale per row of ", keys_name, "), got ",
                    key_scales->sizes());
  check_same_device(op, keys_name, keys, scales_name, *key_scales);
}

void check_level(const char* op, const at::Tensor& probes, const at::Tensor& keys,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& key_scales,
                 const std::string& probes_name, const std::string& keys_name, const std::string& mask_name,
                 const std::string& scales_name) {
  check_float(op, probes_name, probes);
  check_key_dtype(op, keys_name, keys, scales_name);
  check_dim(op, probes_name, probes, 3, "[B, P, D]");
  check_dim(op, keys_name, keys, 2, "[N, D]");
  TORCH_CHECK_VALUE(probes.size(1) >= 1, op, ": ", probes_name, " must hold at least one probe (P >= 1), got P=0");
  TORCH_CHECK_VALUE(probes.size(2) == keys.size(1), op, ": ", probes_name, " has D=", probes.size(2), " but ",
                    keys_name, " has D=", keys.size(1));
  check_same_device(op, probes_name, probes, keys_name, keys);
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": ", mask_name, " must be bool, got ",
                     mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == keys.size(0), op, ": ", mask_name,
                      " must have shape [", keys.size(0), "], got ", mask->sizes());
    check_same_device(op, keys_name, keys, mask_name, *mask);
  }
  check_key_scales(op, keys, key_scales, keys_name, scales_name);
}

void check_parents(const char* op, const at::Tensor& parents, const at::Tensor& probes, int64_t num_children,
                   int64_t fanout) {
  check_int64(op, "parents", parents);
  check_dim(op, "parents", parents, 2, "[B, T]");
  TORCH_CHECK_VALUE(parents.size(0) == probes.size(0), op, ": parents has B=", parents.size(0),
                    " rows but probes has B=", probes.size(0));
  check_same_device(op, "probes", probes, "parents", parents);
  TORCH_CHECK_VALUE(parents.size(1) == 0 || fanout <= std::numeric_limits<int64_t>::max() / parents.size(1), op,
                    ": T * fanout overflows int64 (T=", parents.size(1), ", fanout=", fanout, ")");
  const int64_t num_parents = ceil_div(num_children, fanout);
  const at::Tensor host = parents.contiguous().cpu();
  const int64_t* data = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    TORCH_CHECK_INDEX(data[i] >= -1 && data[i] < num_parents, op,
                      ": parents must be -1 or in [0, ceil(N / fanout)) = [0, ", num_parents, "), got ", data[i]);
  }
}

at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

static bool poison_outputs() {
  static const bool enabled = [] {
    const char* value = std::getenv("MLLM_POISON_OUTPUTS");
    return value != nullptr && std::string(value) == "1";
  }();
  return enabled;
}

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
  if (poison_outputs()) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(std::numeric_limits<int64_t>::min());
    }
  }
  return out;
}

}  // namespace mllm
