// chunk_offsets on the CPU: segments split into chunks of at most chunk_size rows.
#include <ATen/ATen.h>

#include "../checks.h"
#include "kernels.h"

namespace mllm::cpu {

std::tuple<at::Tensor, at::Tensor> chunk_offsets(const at::Tensor& seg_offsets, int64_t chunk_size) {
  const char* op = "chunk_offsets";
  check_offsets(op, "seg_offsets", seg_offsets, -1);
  check_at_least_one(op, "chunk_size", chunk_size);
  const at::Tensor segs = seg_offsets.contiguous();
  const int64_t* seg = segs.data_ptr<int64_t>();
  const int64_t num_segments = segs.numel() - 1;
  int64_t num_chunks = 0;
  for (int64_t s = 0; s < num_segments; ++s) num_chunks += ceil_div(seg[s + 1] - seg[s], chunk_size);

  at::Tensor offsets = empty_output({num_chunks + 1}, segs.options());
  at::Tensor segment = empty_output({num_chunks}, segs.options());
  int64_t* offset_data = offsets.data_ptr<int64_t>();
  int64_t* segment_data = segment.data_ptr<int64_t>();
  int64_t c = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    for (int64_t k = 0, n = ceil_div(seg[s + 1] - seg[s], chunk_size); k < n; ++k) {
      offset_data[c] = seg[s] + k * chunk_size;
      segment_data[c++] = s;
    }
  }
  offset_data[num_chunks] = seg[num_segments];
  return {offsets, segment};
}

}  // namespace mllm::cpu
