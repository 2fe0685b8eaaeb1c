// Host glue shared by the CUDA ops: descriptor upload and the multi-tensor row reduction launch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../tensor_list.h"
#include "reductions.cuh"

namespace privfast {
namespace cuda {

// Copies POD descriptors to `device` through pinned memory, asynchronously on the current stream
// (the caching host allocator keeps the staging buffer alive until the copy has run).
template <typename T>
at::Tensor to_device(const std::vector<T>& items, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(items.size() * sizeof(T))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), items.data(), items.size() * sizeof(T));
  return host.to(device, /*non_blocking=*/true);
}

inline c10::cuda::CUDAStream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Blocks for a grid-stride loop over `work` items: enough to fill the device, no more.
inline unsigned grid_for(int64_t work, int threads) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t max_blocks = 32 * static_cast<int64_t>(sms);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, max_blocks)));
}

// For every (tensor t, row b): ||a_t[b]||^2 (N = 1), or (a.r, a.a, r.r) against reference row
// index[b] (N = 3), as a double tensor [N, tensors, rows] on the device.
template <int N>
at::Tensor reduce_rows(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& refs, const at::Tensor& index) {
  const auto n = row_numels(a);
  const int64_t rows = a[0].size(0), tensors = static_cast<int64_t>(a.size());
  const auto segments = row_segments(n, rows);
  at::Tensor out = at::zeros({N, tensors, rows}, a[0].options().dtype(at::kDouble));
  if (segments.empty()) return out;

  std::vector<SegmentDesc> desc;
  std::vector<int64_t> first(tensors * rows + 1, 0);
  desc.reserve(segments.size());
  for (const Segment& s : segments) {
    desc.push_back({a[s.tensor].const_data_ptr(), refs.empty() ? nullptr : refs[s.tensor].const_data_ptr(), s.row,
                    n[s.tensor], s.begin, s.end});
    ++first[s.tensor * rows + s.row + 1];
  }
  std::partial_sum(first.begin(), first.end(), first.begin());
  const at::Device device = a[0].device();
  const at::Tensor segments_dev = to_device(desc, device);
  const at::Tensor first_dev = to_device(first, device);
  at::Tensor partials = at::empty({static_cast<int64_t>(segments.size()) * N}, out.options());
  const auto stream = current_stream();
  const auto* seg = reinterpret_cast<const SegmentDesc*>(segments_dev.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "privfast_reduce_rows", [&] {
    if constexpr (N == 1) {
      segment_squares_kernel<scalar_t><<<segments.size(), kReduceThreads, 0, stream>>>(seg, partials.data_ptr<double>());
    } else {
      segment_cosine_terms_kernel<scalar_t><<<segments.size(), kReduceThreads, 0, stream>>>(
          seg, index.const_data_ptr<int64_t>(), refs[0].size(0), partials.data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  combine_segments_kernel<N><<<grid_for(tensors * rows, 256), 256, 0, stream>>>(
      partials.const_data_ptr<double>(), reinterpret_cast<const int64_t*>(first_dev.const_data_ptr()), tensors, rows,
      out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace privfast
