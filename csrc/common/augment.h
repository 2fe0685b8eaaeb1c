// Where each output pixel of augment_batch comes from, shared by the CPU and CUDA kernels.
#pragma once

#include <stdint.h>

#include "philox.h"  // PF_HOST_DEVICE

namespace privfast {
namespace augment {

// Index into an axis of `size` pixels after reflect padding (the edge pixel is not repeated);
// valid for -size < i < 2 * size - 1, which padding < size guarantees.
PF_HOST_DEVICE int64_t reflect(int64_t i, int64_t size) {
  i = i < 0 ? -i : i;
  return i >= size ? 2 * (size - 1) - i : i;
}

// `i` limited to [low, high]: the kernels never read outside x, whatever the draws (the CUDA glue
// skips the host-side range check, which would cost a sync on every call).
PF_HOST_DEVICE int64_t clamp_index(int64_t i, int64_t low, int64_t high) { return i < low ? low : (i > high ? high : i); }

// The draws of one call, as raw pointers: crop offsets [B, k, 2], flips [B, k], mixup pairs
// [B, mixups, 2], mixup weights [B, mixups]; extra [B, k_extra, C, H, W] or null.
template <typename scalar_t, typename acc_t>
struct Plan {
  const scalar_t* x;
  const scalar_t* extra;
  const int64_t* crop_offsets;
  const bool* flips;
  const int64_t* mix_pairs;
  const acc_t* mix_lambda;
  int64_t channels, height, width, k, k_extra, mixups, padding;

  PF_HOST_DEVICE int64_t rows_per_example() const { return k + k_extra + mixups; }

  // Row and column of x that row i / column j of crop `draw` (= b * k + crop) reads.
  PF_HOST_DEVICE int64_t crop_row(int64_t draw, int64_t i) const {
    return reflect(i + clamp_index(crop_offsets[2 * draw], 0, 2 * padding) - padding, height);
  }
  PF_HOST_DEVICE int64_t crop_col(int64_t draw, int64_t j) const {
    return reflect((flips[draw] ? width - 1 - j : j) + clamp_index(crop_offsets[2 * draw + 1], 0, 2 * padding) - padding,
                   width);
  }

  // Channel c of base row `row` of example b (a crop when row < k: read through crop_row/crop_col).
  PF_HOST_DEVICE const scalar_t* base_plane(int64_t b, int64_t row, int64_t c) const {
    return row < k ? x + (b * channels + c) * height * width
                   : extra + ((b * k_extra + row - k) * channels + c) * height * width;
  }

  // Pixel (c, i, j) of base row `row` of example b.
  PF_HOST_DEVICE acc_t base_pixel(int64_t b, int64_t row, int64_t c, int64_t i, int64_t j) const {
    const scalar_t* plane = base_plane(b, row, c);
    if (row >= k) return static_cast<acc_t>(plane[i * width + j]);
    return static_cast<acc_t>(plane[crop_row(b * k + row, i) * width + crop_col(b * k + row, j)]);
  }

  // Pixel (c, i, j) of output row `row` of example b.
  PF_HOST_DEVICE acc_t pixel(int64_t b, int64_t row, int64_t c, int64_t i, int64_t j) const {
    if (row < k + k_extra) return base_pixel(b, row, c, i, j);
    const int64_t draw = b * mixups + row - k - k_extra;
    const acc_t lam = mix_lambda[draw];
    const acc_t p = base_pixel(b, clamp_index(mix_pairs[2 * draw], 0, k + k_extra - 1), c, i, j);
    const acc_t q = base_pixel(b, clamp_index(mix_pairs[2 * draw + 1], 0, k + k_extra - 1), c, i, j);
    return lam * p + (acc_t(1) - lam) * q;
  }
};

}  // namespace augment
}  // namespace privfast
