#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../augment_args.h"

namespace privfast {
namespace {

at::Tensor augment_batch_cpu(const at::Tensor& x, const at::Tensor& crop_offsets, const at::Tensor& flips,
                             const at::Tensor& mix_pairs, const at::Tensor& mix_lambda,
                             const std::optional<at::Tensor>& extra, int64_t padding) {
  const AugmentCall call = prepare_augment(x, crop_offsets, flips, mix_pairs, mix_lambda, extra, padding);
  const int64_t height = x.size(2), width = x.size(3), channels = x.size(1);
  const int64_t rows = call.out.size(0) / std::max<int64_t>(x.size(0), 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "augment_batch", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto plan = call.plan<scalar_t>();
    const int64_t base_rows = plan.k + plan.k_extra;
    scalar_t* dst = call.out.data_ptr<scalar_t>();
    // One task per output image: the crop's source rows and columns are tabled once, then every
    // channel is a plain gather (a mixup gathers two base images).
    at::parallel_for(0, call.out.size(0), 1, [&](int64_t first, int64_t last) {
      std::vector<int64_t> src_rows(2 * height), src_cols(2 * width);
      for (int64_t image = first; image < last; ++image) {
        const int64_t b = image / rows, row = image % rows;
        const bool is_mix = row >= base_rows;
        const int64_t draw = b * plan.mixups + row - base_rows;
        const int64_t sources[2] = {is_mix ? plan.mix_pairs[2 * draw] : row, is_mix ? plan.mix_pairs[2 * draw + 1] : row};
        for (int s = 0; s < (is_mix ? 2 : 1); ++s) {
          const bool crop = sources[s] < plan.k;
          for (int64_t i = 0; i < height; ++i) src_rows[s * height + i] = crop ? plan.crop_row(b * plan.k + sources[s], i) : i;
          for (int64_t j = 0; j < width; ++j) src_cols[s * width + j] = crop ? plan.crop_col(b * plan.k + sources[s], j) : j;
        }
        const acc_t lam = is_mix ? plan.mix_lambda[draw] : acc_t(1);
        for (int64_t c = 0; c < channels; ++c) {
          scalar_t* out = dst + (image * channels + c) * height * width;
          const scalar_t* p = plan.base_plane(b, sources[0], c);
          const scalar_t* q = plan.base_plane(b, sources[1], c);
          for (int64_t i = 0; i < height; ++i) {
            const scalar_t* p_row = p + src_rows[i] * width;
            if (!is_mix) {
              for (int64_t j = 0; j < width; ++j) out[i * width + j] = p_row[src_cols[j]];
              continue;
            }
            const scalar_t* q_row = q + src_rows[height + i] * width;
            for (int64_t j = 0; j < width; ++j) {
              const acc_t a = static_cast<acc_t>(p_row[src_cols[j]]), z = static_cast<acc_t>(q_row[src_cols[width + j]]);
              out[i * width + j] = static_cast<scalar_t>(lam * a + (acc_t(1) - lam) * z);
            }
          }
        }
      }
    });
  });
  return call.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CPU, m) { m.impl("augment_batch", &augment_batch_cpu); }

}  // namespace privfast
