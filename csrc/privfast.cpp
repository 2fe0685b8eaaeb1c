// Every privfast op schema, in one library. Backends register in cpu/*.cpp and cuda/*.cu with
// TORCH_LIBRARY_IMPL; the fake (meta) kernels are registered from Python in privfast/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing privfast._C loads this library, whose static initializers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "privfast's compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(privfast, m) {
  // ||G[b]|| over all tensors: grads[i] is [B, *shape_i] -> [B].
  m.def("per_sample_norms(Tensor[] grads) -> Tensor");
  // scale * (sum_b min(1, C / (n_b + 1e-6)) * G_i[b] + noise_std * z_i), z from Philox (seed, offset).
  m.def(
      "clip_accumulate_noise(Tensor[] grads, float max_grad_norm, float noise_std, float scale, int seed, "
      "int offset, bool check_finite) -> Tensor[]");
  // cos(grads[:, n], refs[:, index[n]]), whole-model or mean of per-tensor cosines -> [N].
  m.def("gradsim(Tensor[] grads, Tensor[] refs, Tensor index, bool per_layer) -> Tensor");
  // Crops, flips and mixups of x [B, C, H, W] -> [B * (k + k_extra + mixups), C, H, W].
  m.def(
      "augment_batch(Tensor x, Tensor crop_offsets, Tensor flips, Tensor mix_pairs, Tensor mix_lambda, "
      "Tensor? extra, int padding) -> Tensor");
}
