// Checks of augment_batch's arguments, shared by the CPU and CUDA glue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>

#include "common/augment.h"

namespace privfast {

// The checked, contiguous inputs of one augment_batch call and its output, shared by the backends.
struct AugmentCall {
  at::Tensor x, crop_offsets, flips, mix_pairs, mix_lambda, extra, out;
  int64_t padding;

  template <typename scalar_t>
  augment::Plan<scalar_t, at::opmath_type<scalar_t>> plan() const {
    return {x.const_data_ptr<scalar_t>(),
            extra.defined() ? extra.const_data_ptr<scalar_t>() : nullptr,
            crop_offsets.const_data_ptr<int64_t>(),
            flips.const_data_ptr<bool>(),
            mix_pairs.const_data_ptr<int64_t>(),
            mix_lambda.const_data_ptr<at::opmath_type<scalar_t>>(),
            x.size(1), x.size(2), x.size(3), flips.size(1), extra.defined() ? extra.size(1) : 0, mix_pairs.size(1),
            padding};
  }
};

inline void check_augment_args(const at::Tensor& x, const at::Tensor& crop_offsets, const at::Tensor& flips,
                               const at::Tensor& mix_pairs, const at::Tensor& mix_lambda,
                               const std::optional<at::Tensor>& extra, int64_t padding) {
  TORCH_CHECK_VALUE(x.dim() == 4 && at::isFloatingType(x.scalar_type()), "x must be a float tensor [B, C, H, W], got ",
                    x.sizes(), " ", x.scalar_type());
  const int64_t batch = x.size(0);
  TORCH_CHECK_VALUE(padding >= 0 && padding < x.size(2) && padding < x.size(3),
                    "padding must be in [0, min(H, W)) for reflect padding, got ", padding, " for x ", x.sizes());
  TORCH_CHECK_VALUE(flips.scalar_type() == at::kBool && flips.dim() == 2 && flips.size(0) == batch,
                    "flips must be bool [B, k], got ", flips.scalar_type(), " ", flips.sizes());
  const int64_t k = flips.size(1);
  TORCH_CHECK_VALUE(crop_offsets.scalar_type() == at::kLong && crop_offsets.sizes() == at::IntArrayRef({batch, k, 2}),
                    "crop_offsets must be int64 [B, k, 2] = [", batch, ", ", k, ", 2], got ", crop_offsets.scalar_type(),
                    " ", crop_offsets.sizes());
  TORCH_CHECK_VALUE(mix_pairs.scalar_type() == at::kLong && mix_pairs.dim() == 3 && mix_pairs.size(0) == batch &&
                        mix_pairs.size(2) == 2,
                    "mix_pairs must be int64 [B, mixups, 2], got ", mix_pairs.scalar_type(), " ", mix_pairs.sizes());
  const auto lambda_dtype = at::toOpMathType(x.scalar_type());
  TORCH_CHECK_VALUE(mix_lambda.scalar_type() == lambda_dtype &&
                        mix_lambda.sizes() == at::IntArrayRef({batch, mix_pairs.size(1)}),
                    "mix_lambda must be ", lambda_dtype, " [B, mixups] = [", batch, ", ", mix_pairs.size(1), "], got ",
                    mix_lambda.scalar_type(), " ", mix_lambda.sizes());
  int64_t k_extra = 0;
  if (extra.has_value()) {
    const at::Tensor& e = *extra;
    TORCH_CHECK_VALUE(e.dim() == 5 && e.size(0) == batch && e.sizes().slice(2) == x.sizes().slice(1),
                      "extra must be [B, k_extra, C, H, W] matching x ", x.sizes(), ", got ", e.sizes());
    TORCH_CHECK_VALUE(e.scalar_type() == x.scalar_type() && e.device() == x.device(), "extra is ", e.scalar_type(),
                      " on ", e.device(), " but x is ", x.scalar_type(), " on ", x.device());
    k_extra = e.size(1);
  }
  for (const at::Tensor* t : {&crop_offsets, &flips, &mix_pairs, &mix_lambda}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "augment parameters must be on x's device ", x.device(), ", got ",
                      t->device());
  }
  // Out-of-range draws are refused here on the CPU. On CUDA the check would cost a host sync on every
  // training step, so it is left to the kernels' clamping (memory safety) and to the Python wrapper,
  // which checks parameters a user passes (privfast's own draws are in range by construction).
  if (x.is_cpu() && batch > 0 && (k > 0 || mix_pairs.size(1) > 0)) {
    const at::Tensor bad_crop = k > 0 ? (crop_offsets.lt(0) | crop_offsets.gt(2 * padding)).any()
                                      : at::zeros({}, crop_offsets.options().dtype(at::kBool));
    const at::Tensor bad_pair = mix_pairs.size(1) > 0 ? (mix_pairs.lt(0) | mix_pairs.ge(k + k_extra)).any()
                                                      : at::zeros({}, mix_pairs.options().dtype(at::kBool));
    const at::Tensor bad = at::stack({bad_crop, bad_pair}).cpu();
    TORCH_CHECK_VALUE(!bad[0].item<bool>(), "crop_offsets must lie in [0, 2 * padding] = [0, ", 2 * padding, "]");
    TORCH_CHECK_VALUE(!bad[1].item<bool>(), "mix_pairs must index the k + k_extra = ", k + k_extra,
                      " base rows of an example");
  }
}

inline AugmentCall prepare_augment(const at::Tensor& x, const at::Tensor& crop_offsets, const at::Tensor& flips,
                                   const at::Tensor& mix_pairs, const at::Tensor& mix_lambda,
                                   const std::optional<at::Tensor>& extra, int64_t padding) {
  check_augment_args(x, crop_offsets, flips, mix_pairs, mix_lambda, extra, padding);
  AugmentCall call{x.contiguous(), crop_offsets.contiguous(), flips.contiguous(), mix_pairs.contiguous(),
                   mix_lambda.contiguous(), extra.has_value() ? extra->contiguous() : at::Tensor(), at::Tensor(),
                   padding};
  const int64_t rows = flips.size(1) + (extra.has_value() ? extra->size(1) : 0) + mix_pairs.size(1);
  call.out = at::empty({x.size(0) * rows, x.size(1), x.size(2), x.size(3)}, x.options());
  return call;
}

}  // namespace privfast
