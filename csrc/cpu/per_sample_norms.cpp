#include <torch/library.h>

#include "../tensor_list.h"
#include "reductions.h"

namespace privfast {
namespace {

at::Tensor per_sample_norms_cpu(at::TensorList grads_in) {
  const auto grads = checked_rows(grads_in, "grads");
  return cpu::row_squares(grads).sum(0).sqrt().to(grads[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CPU, m) { m.impl("per_sample_norms", &per_sample_norms_cpu); }

}  // namespace privfast
