// Schemas of the mllm_kernels operators and the CPU registrations.
//
// The schemas live here, once; CPU kernels are in csrc/cpu/, CUDA kernels in csrc/cuda/ (when
// built). Fake kernels, autograd and the Triton fallback for CUDA tensors are registered from
// Python (mllm_kernels/__init__.py). key_scales (last, default None) goes with int8 keys: one
// float32 scale per key row (descend_tree: None, or one optional entry per level).
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

// An importable, empty Python module: `import mllm_kernels._C` loads this library, whose static
// initialisers register the operators with the dispatcher. There is no pybind surface.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mllm_kernels, m) {
  m.def("chunk_offsets(Tensor seg_offsets, int chunk_size) -> (Tensor, Tensor)");
  m.def("cls_pool(Tensor x, Tensor q, Tensor chunk_offsets, float scale) -> (Tensor, Tensor)");
  m.def(
      "cls_pool_backward(Tensor grad_out, Tensor? grad_lse, Tensor x, Tensor q, "
      "Tensor chunk_offsets, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor)");
  m.def(
      "score_children(Tensor probes, Tensor keys, Tensor parents, int fanout, str reduce, "
      "Tensor? mask, Tensor? key_scales=None) -> (Tensor, Tensor)");
  m.def(
      "score_children_backward(Tensor grad_scores, Tensor probes, Tensor keys, "
      "Tensor child_ids, str reduce, Tensor? key_scales=None) -> (Tensor, Tensor)");
  m.def(
      "descend(Tensor probes, Tensor keys, Tensor parents, int fanout, int t, str reduce, "
      "Tensor? mask, Tensor? key_scales=None) -> (Tensor, Tensor)");
  m.def(
      "descend_tree(Tensor[] probes, Tensor[] keys, int fanout, int[] t, str reduce, "
      "Tensor?[] masks, Tensor?[]? key_scales=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mllm_kernels, CPU, m) {
  m.impl("chunk_offsets", &mllm::cpu::chunk_offsets);
  m.impl("cls_pool", &mllm::cpu::cls_pool);
  m.impl("cls_pool_backward", &mllm::cpu::cls_pool_backward);
  m.impl("score_children", &mllm::cpu::score_children);
  m.impl("score_children_backward", &mllm::cpu::score_children_backward);
  m.impl("descend", &mllm::cpu::descend);
  m.impl("descend_tree", &mllm::cpu::descend_tree);
}
