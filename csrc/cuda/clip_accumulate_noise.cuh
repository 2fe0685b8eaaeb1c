// The second pass of clip_accumulate_noise on the GPU (device code only): every output element
// starts from its noise and adds the clipped examples in order, the order the CPU kernel uses.
#pragma once

#include <stdint.h>

#include "../common/philox.h"

namespace privfast {
namespace cuda {

constexpr int kAccumulateThreads = 256;
// Philox groups (element pairs) per block: one block covers 2 * 4 * 256 = 2048 elements.
constexpr int kGroupsPerThread = 4;

// Elements [begin, end) of one parameter tensor, `stream_start` its first element's noise index.
struct ChunkDesc {
  const void* grads;  // [rows, row_numel]
  void* out;          // [row_numel]
  int64_t row_numel;
  int64_t begin;
  int64_t end;
  int64_t stream_start;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void accumulate_element(const ChunkDesc& c, int64_t j, double noise, int64_t rows,
                                                   const acc_t* __restrict__ factors, acc_t scale) {
  const scalar_t* g = static_cast<const scalar_t*>(c.grads) + j;
  acc_t acc = static_cast<acc_t>(noise);
#pragma unroll 4
  for (int64_t b = 0; b < rows; ++b) acc += factors[b] * static_cast<acc_t>(g[b * c.row_numel]);
  static_cast<scalar_t*>(c.out)[j] = static_cast<scalar_t>(scale * acc);
}

// One block per chunk; each thread owns whole Philox groups so no normal is computed twice.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kAccumulateThreads)
clip_accumulate_kernel(const ChunkDesc* __restrict__ chunks, const acc_t* __restrict__ factors, int64_t rows,
                       double noise_std, uint64_t seed, uint64_t offset, acc_t scale) {
  const ChunkDesc c = chunks[blockIdx.x];
  const int64_t first_element = c.stream_start + c.begin, last_element = c.stream_start + c.end;
  const int64_t first_group = first_element >> 1, last_group = (last_element + 1) >> 1;
  for (int64_t group = first_group + threadIdx.x; group < last_group; group += kAccumulateThreads) {
    double z0 = 0.0, z1 = 0.0;
    if (noise_std != 0.0) philox::normal_pair(seed, offset, static_cast<uint64_t>(group), &z0, &z1);
    const int64_t e0 = 2 * group;
    if (e0 >= first_element) {
      accumulate_element<scalar_t, acc_t>(c, e0 - c.stream_start, noise_std * z0, rows, factors, scale);
    }
    if (e0 + 1 < last_element) {
      accumulate_element<scalar_t, acc_t>(c, e0 + 1 - c.stream_start, noise_std * z1, rows, factors, scale);
    }
  }
}

}  // namespace cuda
}  // namespace privfast
