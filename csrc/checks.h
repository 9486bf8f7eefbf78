// Input checks shared by the operator implementations. Each raises the Python exception type
// the SPEC asks for: TypeError (dtype), ValueError (shape, value), IndexError (id, offset),
// with a message that names the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace mllm {

void check_float(const char* op, const std::string& name, const at::Tensor& t);
void check_int64(const char* op, const std::string& name, const at::Tensor& t);
void check_dim(const char* op, const std::string& name, const at::Tensor& t, int64_t dim, const char* shape);
void check_same_device(const char* op, const std::string& name_a, const at::Tensor& a,
                       const std::string& name_b, const at::Tensor& b);
void check_at_least_one(const char* op, const char* name, int64_t value);
// Returns true for "lse", false for "max".
bool parse_reduce(const char* op, const std::string& reduce);
// int64 [K + 1], K >= 0, non-decreasing, in [0, num_rows] (no upper bound when num_rows < 0).
void check_offsets(const char* op, const char* name, const at::Tensor& offsets, int64_t num_rows);
// probes [B, P >= 1, D], keys [N, D] (float, or int8 with key_scales), optional bool mask [N],
// optional key_scales (see check_key_scales), one device.
void check_level(const char* op, const at::Tensor& probes, const at::Tensor& keys,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& key_scales,
                 const std::string& probes_name = "probes", const std::string& keys_name = "keys",
                 const std::string& mask_name = "mask", const std::string& scales_name = "key_scales");
// keys are float32, float16, bfloat16, float64 or int8.
void check_key_dtype(const char* op, const std::string& name, const at::Tensor& keys,
                     const std::string& scales_name = "key_scales");
// keys [N, D]: int8 keys need key_scales, float32 [N] on the keys' device; float keys take none.
void check_key_scales(const char* op, const at::Tensor& keys, const std::optional<at::Tensor>& key_scales,
                      const std::string& keys_name = "keys", const std::string& scales_name = "key_scales");
// int64 [B, T] with ids -1 or in [0, ceil(num_children / fanout)), and T * fanout within int64.
void check_parents(const char* op, const at::Tensor& parents, const at::Tensor& probes,
                   int64_t num_children, int64_t fanout);

// ceil(n / d) for n >= 0, d >= 1, without overflow.
inline int64_t ceil_div(int64_t n, int64_t d) { return n == 0 ? 0 : (n - 1) / d + 1; }

// float64 when either input is float64, else float32: the accumulation and score dtype.
at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b);

// at::empty, filled with NaN / the smallest int64 when MLLM_POISON_OUTPUTS=1 (tests set it to
// catch outputs a kernel leaves half-written).
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace mllm
