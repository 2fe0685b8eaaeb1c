#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "../clip_args.h"
#include "../tensor_list.h"
#include "reductions.h"
#include "simd.h"

namespace privfast {
namespace {

// Bytes of per-example gradients a thread keeps in its L2 between the two reads of a row block.
constexpr int64_t kCacheBudget = 384 * 1024;

// Columns [begin, end) of the rows of tensor `tensor`.
// The output itself holds the running sums when it has the accumulate type (float, double).
template <typename acc_t, typename scalar_t>
acc_t* in_place_accumulator(scalar_t* out) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return out;
  } else {
    return nullptr;
  }
}

struct Columns {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<at::Tensor> clip_accumulate_noise_cpu(at::TensorList grads_in, double max_grad_norm, double noise_std,
                                                  double scale, int64_t seed, int64_t offset, bool check_finite) {
  check_clip_args(max_grad_norm, noise_std, scale);
  const auto grads = checked_rows(grads_in, "grads");
  const auto n = row_numels(grads);
  const int64_t rows = grads[0].size(0);
  const int64_t num_tensors = static_cast<int64_t>(grads.size());

  std::vector<at::Tensor> outputs;
  std::vector<Columns> columns;
  std::vector<int64_t> stream_start(num_tensors);
  int64_t total = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    outputs.push_back(at::empty(grads[t].sizes().slice(1), grads[t].options()));
    for (int64_t b = 0; b < n[t]; b += kSegmentElements) columns.push_back({t, b, std::min(b + kSegmentElements, n[t])});
    stream_start[t] = total;
    total += n[t];
  }
  const int64_t num_columns = static_cast<int64_t>(columns.size());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "clip_accumulate_noise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool in_place = std::is_same_v<acc_t, scalar_t>;
    std::vector<acc_t> buffer(in_place ? 0 : total);  // half types sum in float
    auto acc_of = [&](const Columns& c) -> acc_t* {
      return in_place ? in_place_accumulator<acc_t>(outputs[c.tensor].data_ptr<scalar_t>() + c.begin)
                      : buffer.data() + stream_start[c.tensor] + c.begin;
    };
    auto row_of = [&](const Columns& c, int64_t r) {
      return grads[c.tensor].const_data_ptr<scalar_t>() + r * n[c.tensor] + c.begin;
    };
    // Each parallel_for below hands every thread the same contiguous run of columns, so a row block
    // read for the norms is still in that thread's L2 when it is read again for the sums.
    auto for_columns = [&](const auto& body) {
      at::parallel_for(0, num_columns, 1, [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) body(i, columns[i]);
      });
    };
    const int64_t bytes_per_row = std::max<int64_t>(1, total * static_cast<int64_t>(sizeof(scalar_t)) /
                                                           std::max(1, at::get_num_threads()));
    const int64_t block_rows = std::clamp<int64_t>(kCacheBudget / bytes_per_row, 1, std::max<int64_t>(rows, 1));

    for_columns([&](int64_t, const Columns& c) {
      cpu::fill_noise(acc_of(c), stream_start[c.tensor] + c.begin, c.end - c.begin, noise_std,
                      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    });
    std::vector<double> partial(num_columns * block_rows);
    std::vector<acc_t> factors(block_rows);
    for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
      const int64_t r1 = std::min(rows, r0 + block_rows);
      // First read of the block: squared norms per column run.
      for_columns([&](int64_t i, const Columns& c) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* g = row_of(c, r);
          partial[i * block_rows + r - r0] = cpu::dot(g, g, c.end - c.begin);
        }
      });
      bool finite = true;
      for (int64_t r = r0; r < r1; ++r) {
        double square = 0;
        for (int64_t i = 0; i < num_columns; ++i) square += partial[i * block_rows + r - r0];
        const double norm = std::sqrt(square);
        finite &= std::isfinite(norm);
        factors[r - r0] = static_cast<acc_t>(clip_factor(norm, max_grad_norm));
      }
      if (check_finite && !finite) {  // error path only: a full pass to name every bad example
        const at::Tensor squares = cpu::row_squares(grads);
        const at::Tensor norms = squares.sum(0).sqrt();
        check_finite_norms(squares.const_data_ptr<double>(), norms.const_data_ptr<double>(), num_tensors, rows,
                           "grads");
      }
      // Second read, from cache: the clipped rows of the block join the running sums in row order.
      for_columns([&](int64_t, const Columns& c) {
        cpu::accumulate_rows(acc_of(c), factors.data(), row_of(c, r0), n[c.tensor], r1 - r0, c.end - c.begin);
      });
    }
    for_columns([&](int64_t, const Columns& c) {
      cpu::scale_store(outputs[c.tensor].data_ptr<scalar_t>() + c.begin, acc_of(c), static_cast<acc_t>(scale),
                       c.end - c.begin);
    });
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CPU, m) { m.impl("clip_accumulate_noise", &clip_accumulate_noise_cpu); }

}  // namespace privfast
