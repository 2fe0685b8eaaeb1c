// gradsim's checks and its final combination of per-tensor sums, shared by the CPU and CUDA glue.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "tensor_list.h"

namespace privfast {

// Floor of ||a|| * ||r||: a zero gradient has cosine 0 instead of NaN (the reference's COSINE_EPS).
constexpr double kCosineEps = 1e-12;

// The checked, contiguous inputs of one gradsim call, shared by the backends.
struct GradsimCall {
  std::vector<at::Tensor> grads, refs;
  at::Tensor index;
};

inline GradsimCall prepare_gradsim(at::TensorList grads_in, at::TensorList refs_in, const at::Tensor& index) {
  const auto grads = checked_rows(grads_in, "grads");
  const auto refs = checked_rows(refs_in, "refs");
  TORCH_CHECK_VALUE(grads.size() == refs.size(), "grads has ", grads.size(), " tensors but refs has ", refs.size(),
                    "; they must pair up");
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK_VALUE(grads[i].sizes().slice(1) == refs[i].sizes().slice(1), "grads[", i, "] is ", grads[i].sizes(),
                      " but refs[", i, "] is ", refs[i].sizes(), ": shapes past dim 0 differ");
    TORCH_CHECK_VALUE(grads[i].scalar_type() == refs[i].scalar_type() && grads[i].device() == refs[i].device(),
                      "refs[", i, "] is ", refs[i].scalar_type(), " on ", refs[i].device(), " but grads[", i, "] is ",
                      grads[i].scalar_type(), " on ", grads[i].device());
  }
  const int64_t n = grads[0].size(0);
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == n,
                    "index must be int64 of shape [", n, "], got ", index.scalar_type(), " ", index.sizes());
  TORCH_CHECK_VALUE(index.device() == grads[0].device(), "index is on ", index.device(), " but grads on ",
                    grads[0].device());
  return {grads, refs, index.contiguous()};
}

// sums: double [3, tensors, N] of (a.r, a.a, r.r) -> cosines [N] in `dtype`.
inline at::Tensor cosines_from_sums(const at::Tensor& sums, bool per_layer, at::ScalarType dtype) {
  const at::Tensor dots = sums[0], aa = sums[1], rr = sums[2];
  if (per_layer) return (dots / (aa * rr).sqrt().clamp_min(kCosineEps)).mean(0).to(dtype);
  return (dots.sum(0) / (aa.sum(0) * rr.sum(0)).sqrt().clamp_min(kCosineEps)).to(dtype);
}

}  // namespace privfast
