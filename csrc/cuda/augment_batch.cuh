// augment_batch on the GPU (device code only): one thread per output pixel, grid-stride.
#pragma once

#include <stdint.h>

#include "../common/augment.h"

namespace privfast {
namespace cuda {

constexpr int kAugmentThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kAugmentThreads)
augment_batch_kernel(augment::Plan<scalar_t, acc_t> plan, int64_t batch, scalar_t* __restrict__ out) {
  const int64_t rows = plan.rows_per_example();
  const int64_t total = batch * rows * plan.channels * plan.height * plan.width;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rest = e;
    const int64_t j = rest % plan.width;
    rest /= plan.width;
    const int64_t i = rest % plan.height;
    rest /= plan.height;
    const int64_t c = rest % plan.channels;
    rest /= plan.channels;
    const int64_t row = rest % rows;
    const int64_t b = rest / rows;
    out[e] = static_cast<scalar_t>(plan.pixel(b, row, c, i, j));
  }
}

}  // namespace cuda
}  // namespace privfast
