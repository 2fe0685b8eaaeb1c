#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../clip_args.h"
#include "../tensor_list.h"
#include "reductions.h"
#include "simd.h"

namespace privfast {
namespace {

// Bytes of per-example gradients a thread keeps in its L2 between the two reads of a row block.
constexpr int64_t kCacheBudget = 384 * 1024;

// The output itself holds the running sums when it has the accumulate type (float, double).
template <typename acc_t, typename scalar_t>
acc_t* in_place_accumulator(scalar_t* out) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return out;
  } else {
    return nullptr;
  }
}

// Columns [begin, end) of the rows of tensor `tensor`.
struct Columns {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Splits the columns into `parts` consecutive runs of about equal element counts: run p is
// columns [bounds[p], bounds[p + 1]).
std::vector<int64_t> balanced_runs(const std::vector<Columns>& columns, int64_t parts) {
  int64_t total = 0;
  for (const Columns& c : columns) total += c.end - c.begin;
  std::vector<int64_t> bounds(parts + 1, static_cast<int64_t>(columns.size()));
  bounds[0] = 0;
  int64_t seen = 0, part = 1;
  for (int64_t i = 0; i < static_cast<int64_t>(columns.size()) && part < parts; ++i) {
    seen += columns[i].end - columns[i].begin;
    while (part < parts && seen * parts >= total * part) bounds[part++] = i + 1;
  }
  return bounds;
}

// What one call works on: the checked inputs, the outputs, and the column runs of the threads.
struct ClipPlan {
  std::vector<at::Tensor> grads, outputs;
  std::vector<int64_t> n, stream_start, runs;
  std::vector<Columns> columns;
  int64_t rows, total;
  int threads;
};

// Fills plan.outputs; returns false (outputs unfinished) if a row's norm is not finite and
// check_finite is set.
template <typename scalar_t>
bool clip_accumulate_noise_kernel(const ClipPlan& plan, double max_grad_norm, double noise_std, double scale,
                                  uint64_t seed, uint64_t offset, bool check_finite) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool in_place = std::is_same_v<acc_t, scalar_t>;
  const auto& grads = plan.grads;
  const auto& outputs = plan.outputs;
  const auto& n = plan.n;
  const auto& stream_start = plan.stream_start;
  const auto& runs = plan.runs;
  const auto& columns = plan.columns;
  const int64_t rows = plan.rows, total = plan.total;
  const int threads = plan.threads;
  const int64_t num_columns = static_cast<int64_t>(columns.size());
  std::vector<acc_t> buffer(in_place ? 0 : total);  // half types sum in float
  auto acc_of = [&](const Columns& c) -> acc_t* {
    return in_place ? in_place_accumulator<acc_t>(outputs[c.tensor].data_ptr<scalar_t>() + c.begin)
                    : buffer.data() + stream_start[c.tensor] + c.begin;
  };
  auto row_of = [&](const Columns& c, int64_t r) {
    return grads[c.tensor].const_data_ptr<scalar_t>() + r * n[c.tensor] + c.begin;
  };
  // Rows per block: a thread's share of a block stays in its L2 between the block's two reads. At
  // least four (the rows accumulate_rows takes per pass over the sums) or all of them, and a multiple
  // of 4 when possible: wider rows would make one-row blocks, each passing over the sums once more.
  const int64_t share_bytes = std::max<int64_t>(1, total * static_cast<int64_t>(sizeof(scalar_t)) / threads);
  int64_t block_rows =
      std::clamp<int64_t>(kCacheBudget / share_bytes, std::min<int64_t>(rows, 4), std::max<int64_t>(rows, 1));
  if (block_rows > 4) block_rows -= block_rows % 4;
  // Partial squared norms per (column, block row), two buffers so that one barrier per block
  // suffices: a thread writing block k + 1's partials never meets one still reading block k's.
  std::vector<double> partial(2 * num_columns * block_rows);
  bool all_finite = true;

  // One parallel region, each thread on its own run of columns throughout, so the second read of a
  // block hits the cache the first read filled. Every thread derives the same clip factors from all
  // the partials, summed in column order: the result does not depend on the thread count.
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int me = omp_get_thread_num();
#else
    const int me = 0;
#endif
    std::vector<acc_t> factors(block_rows, acc_t(1));
    // With no bound every factor is 1 (clip_factor(norm, inf) is 1 for any norm, inf and NaN included),
    // so only the finite check needs the norms.
    const bool norms_needed = std::isfinite(max_grad_norm) || check_finite;
    bool finite = true;
    // The noise goes into a segment's sums right before the first block adds to them and the scaled output
    // is written right after the last block did, while the segment is in cache: a batch of one block passes
    // over the sums once instead of three times. An empty batch still takes one block, of no rows.
    const int64_t blocks = rows == 0 ? 1 : (rows + block_rows - 1) / block_rows;
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t r0 = block * block_rows, r1 = std::min(rows, r0 + block_rows);
      if (norms_needed && r1 > r0) {
        double* block_partial = partial.data() + (block % 2) * num_columns * block_rows;
        for (int64_t i = runs[me]; i < runs[me + 1]; ++i) {
          for (int64_t r = r0; r < r1; ++r) {
            block_partial[i * block_rows + r - r0] =
                cpu::sum_squares(row_of(columns[i], r), columns[i].end - columns[i].begin);
          }
        }
#pragma omp barrier
        for (int64_t r = r0; r < r1; ++r) {
          double square = 0;
          for (int64_t i = 0; i < num_columns; ++i) square += block_partial[i * block_rows + r - r0];
          const double norm = std::sqrt(square);
          finite = finite && (std::isfinite(norm) || !check_finite);
          factors[r - r0] = static_cast<acc_t>(clip_factor(norm, max_grad_norm));
        }
        if (!finite) break;  // every thread sees the same factors and stops: no one is left at a barrier
      }
      const bool first = block == 0, last = block == blocks - 1;
      for (int64_t i = runs[me]; i < runs[me + 1]; ++i) {
        const Columns& c = columns[i];
        acc_t* acc = acc_of(c);
        if (first) cpu::fill_noise(acc, stream_start[c.tensor] + c.begin, c.end - c.begin, noise_std, seed, offset);
        cpu::accumulate_rows(acc, factors.data(), row_of(c, r0), n[c.tensor], r1 - r0, c.end - c.begin);
        if (last) {
          cpu::scale_store(outputs[c.tensor].data_ptr<scalar_t>() + c.begin, acc, static_cast<acc_t>(scale),
                           c.end - c.begin);
        }
      }
    }
    if (!finite && me == 0) {
      all_finite = false;
    }
  }
  return all_finite;
}

std::vector<at::Tensor> clip_accumulate_noise_cpu(at::TensorList grads_in, double max_grad_norm, double noise_std,
                                                  double scale, int64_t seed, int64_t offset, bool check_finite) {
  check_clip_args(max_grad_norm, noise_std, scale);
  ClipPlan plan;
  plan.grads = checked_rows(grads_in, "grads");
  plan.n = row_numels(plan.grads);
  plan.rows = plan.grads[0].size(0);
  plan.total = 0;
  for (size_t t = 0; t < plan.grads.size(); ++t) {
    plan.outputs.push_back(at::empty(plan.grads[t].sizes().slice(1), plan.grads[t].options()));
    for (int64_t b = 0; b < plan.n[t]; b += kSegmentElements) {
      plan.columns.push_back({static_cast<int64_t>(t), b, std::min(b + kSegmentElements, plan.n[t])});
    }
    plan.stream_start.push_back(plan.total);
    plan.total += plan.n[t];
  }
  plan.threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(plan.columns.size()))));
  plan.runs = balanced_runs(plan.columns, plan.threads);
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.grads[0].scalar_type(), "clip_accumulate_noise", [&] {
    finite = clip_accumulate_noise_kernel<scalar_t>(plan, max_grad_norm, noise_std, scale, static_cast<uint64_t>(seed),
                                                    static_cast<uint64_t>(offset), check_finite);
  });
  if (!finite) {  // error path only: a full pass to name every bad example and the first bad tensor
    const at::Tensor squares = cpu::row_squares(plan.grads);
    const at::Tensor norms = squares.sum(0).sqrt();
    check_finite_norms(squares.const_data_ptr<double>(), norms.const_data_ptr<double>(),
                       static_cast<int64_t>(plan.grads.size()), plan.rows, "grads");
  }
  return plan.outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CPU, m) { m.impl("clip_accumulate_noise", &clip_accumulate_noise_cpu); }

}  // namespace privfast
