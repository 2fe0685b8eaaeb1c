#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../clip_args.h"
#include "../common/philox.h"
#include "../tensor_list.h"
#include "reductions.h"

namespace privfast {
namespace {

// Output elements per work item: the accumulator stays in L1 while every example's slice streams by.
constexpr int64_t kChunk = 1024;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// acc[0 .. end-begin) = noise_std * z[begin .. end) of the stream (seed, offset), or 0.
template <typename acc_t>
void init_with_noise(acc_t* acc, int64_t begin, int64_t end, double noise_std, uint64_t seed, uint64_t offset) {
  if (noise_std == 0.0) {
    for (int64_t e = begin; e < end; ++e) acc[e - begin] = acc_t(0);
    return;
  }
  int64_t e = begin;
  while (e < end) {
    double z0, z1;
    philox::normal_pair(seed, offset, static_cast<uint64_t>(e) >> 1, &z0, &z1);
    if ((e & 1) == 0) {
      acc[e - begin] = static_cast<acc_t>(noise_std * z0);
      if (e + 1 < end) acc[e + 1 - begin] = static_cast<acc_t>(noise_std * z1);
      e += 2;
    } else {
      acc[e - begin] = static_cast<acc_t>(noise_std * z1);
      e += 1;
    }
  }
}

std::vector<at::Tensor> clip_accumulate_noise_cpu(at::TensorList grads_in, double max_grad_norm, double noise_std,
                                                  double scale, int64_t seed, int64_t offset, bool check_finite) {
  check_clip_args(max_grad_norm, noise_std, scale);
  const auto grads = checked_rows(grads_in, "grads");
  const auto n = row_numels(grads);
  const int64_t rows = grads[0].size(0);
  const int64_t num_tensors = static_cast<int64_t>(grads.size());

  // First read of the gradients: every example's squared norm, per tensor.
  const at::Tensor squares = cpu::row_squares(grads);
  const at::Tensor norms = squares.sum(0).sqrt();
  if (check_finite) {
    check_finite_norms(squares.const_data_ptr<double>(), norms.const_data_ptr<double>(), num_tensors, rows, "grads");
  }

  std::vector<at::Tensor> outputs;
  std::vector<Chunk> chunks;
  std::vector<int64_t> stream_start(num_tensors);
  int64_t start = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    outputs.push_back(at::empty(grads[t].sizes().slice(1), grads[t].options()));
    for (int64_t b = 0; b < n[t]; b += kChunk) chunks.push_back({t, b, std::min(b + kChunk, n[t])});
    stream_start[t] = start;
    start += n[t];
  }

  // Second read: each output chunk sums the clipped examples in order, after its noise.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "clip_accumulate_noise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> factors(rows);
    const double* norm = norms.const_data_ptr<double>();
    for (int64_t b = 0; b < rows; ++b) factors[b] = static_cast<acc_t>(clip_factor(norm[b], max_grad_norm));
    const acc_t scale_acc = static_cast<acc_t>(scale);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
      acc_t acc[kChunk];
      for (int64_t c = first; c < last; ++c) {
        const Chunk& chunk = chunks[c];
        const int64_t len = chunk.end - chunk.begin;
        const int64_t stream = stream_start[chunk.tensor];
        init_with_noise(acc, stream + chunk.begin, stream + chunk.end, noise_std, static_cast<uint64_t>(seed),
                        static_cast<uint64_t>(offset));
        const scalar_t* g = grads[chunk.tensor].const_data_ptr<scalar_t>() + chunk.begin;
        for (int64_t b = 0; b < rows; ++b) {
          const acc_t factor = factors[b];
          const scalar_t* row = g + b * n[chunk.tensor];
          for (int64_t j = 0; j < len; ++j) acc[j] += factor * static_cast<acc_t>(row[j]);
        }
        scalar_t* out = outputs[chunk.tensor].data_ptr<scalar_t>() + chunk.begin;
        for (int64_t j = 0; j < len; ++j) out[j] = static_cast<scalar_t>(scale_acc * acc[j]);
      }
    });
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CPU, m) { m.impl("clip_accumulate_noise", &clip_accumulate_noise_cpu); }

}  // namespace privfast
