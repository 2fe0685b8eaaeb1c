// The CPU kernels' inner loops. They are compiled once per instruction set (AVX-512, AVX2, baseline)
// in simd.cpp and picked at load time, so one build runs at full width on any x86-64 machine.
// Each loop sums in fixed independent lanes: the compiler may vectorize it without -ffast-math,
// and every instruction set (and thread count) gives the same bits.
#pragma once

#include <ATen/OpMathType.h>

#include <array>
#include <cstdint>

namespace privfast {
namespace cpu {

// sum_j a[j] * b[j], summed in the accumulate type (float, or double for double), returned as double.
template <typename scalar_t>
double dot(const scalar_t* a, const scalar_t* b, int64_t n);

// {sum_j a[j] * r[j], sum_j a[j]^2, sum_j r[j]^2} in one pass, each summed like dot.
template <typename scalar_t>
std::array<double, 3> cosine_sums(const scalar_t* a, const scalar_t* r, int64_t n);

// sum_j a[j]^2, summed like dot(a, a, n) but with one load per element.
template <typename scalar_t>
double sum_squares(const scalar_t* a, int64_t n);

// acc[j] += factors[r] * x[r * stride + j] for rows r < rows in order, j < n. Four rows share one
// load and store of acc, and the additions happen in row order, as one row at a time would do them.
template <typename scalar_t>
void accumulate_rows(at::opmath_type<scalar_t>* acc, const at::opmath_type<scalar_t>* factors, const scalar_t* x,
                     int64_t stride, int64_t rows, int64_t n);

// out[j] = scale * acc[j] for j < n, rounded to scalar_t.
template <typename scalar_t>
void scale_store(scalar_t* out, const at::opmath_type<scalar_t>* acc, at::opmath_type<scalar_t> scale, int64_t n);

// acc[j] = noise_std * z[first + j] for j < n, z the normal stream (seed, offset) of common/philox.h.
template <typename acc_t>
void fill_noise(acc_t* acc, int64_t first, int64_t n, double noise_std, uint64_t seed, uint64_t offset);

}  // namespace cpu
}  // namespace privfast
