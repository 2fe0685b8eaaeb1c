// Host-side helpers shared by the CPU and CUDA glue of every op over a list of per-example
// tensors [B, *shape_i]: input checks with messages that name the offending tensor, and the
// split of the rows into fixed-size segments that the multi-tensor kernels reduce in parallel.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace privfast {

// Elements per segment of a row: small enough to spread a few large rows over many threads,
// large enough that a segment's fixed cost is negligible. Fixed, so results do not depend on
// the number of threads.
constexpr int64_t kSegmentElements = 16384;

// One contiguous range [begin, end) of row `row` of tensor `tensor`.
struct Segment {
  int64_t tensor;
  int64_t row;
  int64_t begin;
  int64_t end;
};

// Checks a non-empty list of [B, *shape_i] tensors (one floating dtype, one device, one B) and
// returns them contiguous. Errors are ValueErrors that name `name[i]`.
std::vector<at::Tensor> checked_rows(at::TensorList tensors, const char* name);

// Elements per row of each tensor: prod(shape_i).
std::vector<int64_t> row_numels(const std::vector<at::Tensor>& tensors);

// Segments of every row of every tensor, ordered by (tensor, row, begin): memory order, so that a
// thread streams through its share; the partial sums of one (tensor, row) are adjacent and always
// summed in the same order.
std::vector<Segment> row_segments(const std::vector<int64_t>& row_numel, int64_t rows);

// Raises a ValueError naming the examples whose norm is not finite and the first tensor that holds
// a bad value of the first of them. `squares` is [tensors, B] in double; `norms` [B].
void check_finite_norms(const double* squares, const double* norms, int64_t num_tensors, int64_t rows,
                        const char* name);

}  // namespace privfast
