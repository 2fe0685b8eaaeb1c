// Multi-tensor row reductions on the GPU (device code only: no torch headers, so that nvcc can
// compile it where torch has no CUDA). One launch covers every segment of every row of every
// tensor; a second launch sums each row's segments in a fixed order, so results are deterministic.
#pragma once

#include <stdint.h>

namespace privfast {
namespace cuda {

constexpr int kReduceThreads = 256;

// One contiguous range [begin, end) of row `row` of one tensor whose rows have `row_numel`
// elements. `a` and `r` point at the tensor and (for gradsim) its reference tensor.
struct SegmentDesc {
  const void* a;
  const void* r;
  int64_t row;
  int64_t row_numel;
  int64_t begin;
  int64_t end;
};

template <int N>
struct Sums {
  double v[N];
};

template <int N>
__device__ __forceinline__ Sums<N> block_sum(Sums<N> mine) {
  __shared__ double scratch[N][kReduceThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    double v = mine.v[k];
    for (int delta = 16; delta > 0; delta /= 2) v += __shfl_down_sync(0xffffffffu, v, delta);
    if (lane == 0) scratch[k][warp] = v;
  }
  __syncthreads();
  Sums<N> total{};
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      for (int w = 0; w < kReduceThreads / 32; ++w) total.v[k] += scratch[k][w];
    }
  }
  return total;
}

// partials[s] = ||a_s||^2 for segment s (one block per segment).
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
segment_squares_kernel(const SegmentDesc* __restrict__ segments, double* __restrict__ partials) {
  const SegmentDesc s = segments[blockIdx.x];
  const scalar_t* a = static_cast<const scalar_t*>(s.a) + s.row * s.row_numel;
  Sums<1> mine{};
  for (int64_t j = s.begin + threadIdx.x; j < s.end; j += kReduceThreads) {
    const double v = static_cast<double>(a[j]);
    mine.v[0] += v * v;
  }
  const Sums<1> total = block_sum(mine);
  if (threadIdx.x == 0) partials[blockIdx.x] = total.v[0];
}

// partials[3 s + (0, 1, 2)] = (a.r, a.a, r.r) of segment s, where r is row index[row] of the references.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
segment_cosine_terms_kernel(const SegmentDesc* __restrict__ segments, const int64_t* __restrict__ index,
                            int64_t num_refs, double* __restrict__ partials) {
  const SegmentDesc s = segments[blockIdx.x];
  const int64_t ref_row = index[s.row];
  if (ref_row < 0 || ref_row >= num_refs) __trap();  // the Python wrapper checks; this guards direct calls
  const scalar_t* a = static_cast<const scalar_t*>(s.a) + s.row * s.row_numel;
  const scalar_t* r = static_cast<const scalar_t*>(s.r) + ref_row * s.row_numel;
  Sums<3> mine{};
  for (int64_t j = s.begin + threadIdx.x; j < s.end; j += kReduceThreads) {
    const double x = static_cast<double>(a[j]), y = static_cast<double>(r[j]);
    mine.v[0] += x * y;
    mine.v[1] += x * x;
    mine.v[2] += y * y;
  }
  const Sums<3> total = block_sum(mine);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) partials[3 * blockIdx.x + k] = total.v[k];
  }
}

// out[(k * tensors + t) * rows + row] = sum of the partials of (t, row), whose segments are
// first[t * rows + row] .. first[t * rows + row + 1] (the order row_segments builds).
template <int N>
__global__ void combine_segments_kernel(const double* __restrict__ partials, const int64_t* __restrict__ first,
                                        int64_t tensors, int64_t rows, double* __restrict__ out) {
  for (int64_t pair = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pair < tensors * rows;
       pair += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = pair / rows, row = pair % rows;
    double total[N] = {0};
    for (int64_t s = first[pair]; s < first[pair + 1]; ++s) {
#pragma unroll
      for (int k = 0; k < N; ++k) total[k] += partials[N * s + k];
    }
#pragma unroll
    for (int k = 0; k < N; ++k) out[(k * tensors + t) * rows + row] = total[k];
  }
}

}  // namespace cuda
}  // namespace privfast
