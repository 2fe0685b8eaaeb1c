// Row reductions over lists of per-example tensors for the CPU kernels. Rows are cut into fixed
// segments (tensor_list.h), reduced in parallel and summed per row in segment order, so the result
// does not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <array>
#include <cstdint>
#include <vector>

#include "../tensor_list.h"
#include "simd.h"

namespace privfast {
namespace cpu {

// For every (tensor t, row b): the N sums that `body(segment)` returns for the segments of that row,
// as a double tensor [N, tensors, rows].
template <int N, typename Body>
at::Tensor reduce_rows(const std::vector<int64_t>& row_numel, int64_t rows, const Body& body) {
  const auto segments = row_segments(row_numel, rows);
  std::vector<std::array<double, N>> partials(segments.size());
  at::parallel_for(0, static_cast<int64_t>(segments.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) partials[s] = body(segments[s]);
  });
  const int64_t num_tensors = static_cast<int64_t>(row_numel.size());
  at::Tensor out = at::zeros({N, num_tensors, rows}, at::kDouble);
  double* sums = out.data_ptr<double>();
  for (size_t s = 0; s < segments.size(); ++s) {
    for (int k = 0; k < N; ++k) sums[(k * num_tensors + segments[s].tensor) * rows + segments[s].row] += partials[s][k];
  }
  return out;
}

// ||G_t[b]||^2 for every tensor t and row b: double [tensors, rows].
inline at::Tensor row_squares(const std::vector<at::Tensor>& grads) {
  const auto n = row_numels(grads);
  at::Tensor squares;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "row_squares", [&] {
    std::vector<const scalar_t*> data;
    for (const auto& g : grads) data.push_back(g.const_data_ptr<scalar_t>());
    squares = reduce_rows<1>(n, grads[0].size(0), [&](const Segment& s) {
      const scalar_t* p = data[s.tensor] + s.row * n[s.tensor] + s.begin;
      return std::array<double, 1>{sum_squares(p, s.end - s.begin)};
    });
  });
  return squares[0];
}

}  // namespace cpu
}  // namespace privfast
