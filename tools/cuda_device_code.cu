// Compiles every privfast CUDA kernel without torch (CI has nvcc but no CUDA torch): includes each
// device-code header and instantiates its templates for float and double.
#include "../csrc/cuda/augment_batch.cuh"
#include "../csrc/cuda/clip_accumulate_noise.cuh"
#include "../csrc/cuda/reductions.cuh"

namespace pc = privfast::cuda;

#define PRIVFAST_INSTANTIATE(T)                                                                                       \
  template __global__ void pc::segment_squares_kernel<T>(const pc::SegmentDesc*, double*);                            \
  template __global__ void pc::segment_cosine_terms_kernel<T>(const pc::SegmentDesc*, const int64_t*, int64_t,         \
                                                              double*);                                               \
  template __global__ void pc::clip_accumulate_kernel<T, T>(const pc::ChunkDesc*, const T*, int64_t, double, uint64_t, \
                                                            uint64_t, T);                                             \
  template __global__ void pc::augment_batch_kernel<T, T>(privfast::augment::Plan<T, T>, int64_t, T*);

PRIVFAST_INSTANTIATE(float)
PRIVFAST_INSTANTIATE(double)
template __global__ void pc::combine_segments_kernel<1>(const double*, const int64_t*, int64_t, int64_t, double*);
template __global__ void pc::combine_segments_kernel<3>(const double*, const int64_t*, int64_t, int64_t, double*);

// The noise on the device must equal the host's bit for bit; this kernel lets a GPU test compare them.
__global__ void philox_normals_kernel(uint64_t seed, uint64_t offset, int64_t n, double* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
    out[e] = privfast::philox::normal(seed, offset, static_cast<uint64_t>(e));
  }
}
