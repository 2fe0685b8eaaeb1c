// Scalar-argument checks of clip_accumulate_noise, shared by the CPU and CUDA glue.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>

namespace privfast {

inline void check_clip_args(double max_grad_norm, double noise_std, double scale) {
  TORCH_CHECK_VALUE(max_grad_norm > 0, "max_grad_norm must be > 0, got ", max_grad_norm);
  TORCH_CHECK_VALUE(noise_std >= 0 && std::isfinite(noise_std), "noise_std must be finite and >= 0, got ", noise_std);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
}

// Added to the norm in the clip factor, as Opacus does: a zero gradient stays finite (the reference's CLIP_EPS).
constexpr double kClipEps = 1e-6;

// min(1, C / (n + kClipEps)), Opacus' clip factor.
inline double clip_factor(double norm, double max_grad_norm) {
  const double factor = max_grad_norm / (norm + kClipEps);
  return factor < 1.0 ? factor : 1.0;
}

}  // namespace privfast
