#include "simd.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/philox.h"

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define PRIVFAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PRIVFAST_CLONES
#endif

namespace privfast {
namespace cpu {

namespace {
// Four AVX-512 vectors (eight AVX2) of independent partial sums: enough to hide the add latency.
constexpr int kLanes = 64;
constexpr int64_t kNoiseBlock = 256;  // normal pairs drawn per vectorized batch
}  // namespace

template <typename scalar_t>
PRIVFAST_CLONES double dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(a[j + l]) * static_cast<acc_t>(b[j + l]);
  }
  double total = 0;
  for (; j < n; ++j) total += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(lanes[l]);
  return total;
}

template <typename scalar_t>
PRIVFAST_CLONES double sum_squares(const scalar_t* a, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(a[j + l]);
      lanes[l] += v * v;
    }
  }
  double total = 0;
  for (; j < n; ++j) total += static_cast<double>(a[j]) * static_cast<double>(a[j]);
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(lanes[l]);
  return total;
}

template <typename scalar_t>
PRIVFAST_CLONES void accumulate_rows(at::opmath_type<scalar_t>* acc, const at::opmath_type<scalar_t>* factors,
                                     const scalar_t* x, int64_t stride, int64_t rows, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const scalar_t *x0 = x + r * stride, *x1 = x0 + stride, *x2 = x1 + stride, *x3 = x2 + stride;
    const acc_t f0 = factors[r], f1 = factors[r + 1], f2 = factors[r + 2], f3 = factors[r + 3];
    for (int64_t j = 0; j < n; ++j) {
      acc_t a = acc[j];
      a += f0 * static_cast<acc_t>(x0[j]);
      a += f1 * static_cast<acc_t>(x1[j]);
      a += f2 * static_cast<acc_t>(x2[j]);
      a += f3 * static_cast<acc_t>(x3[j]);
      acc[j] = a;
    }
  }
  for (; r < rows; ++r) {
    const scalar_t* xr = x + r * stride;
    for (int64_t j = 0; j < n; ++j) acc[j] += factors[r] * static_cast<acc_t>(xr[j]);
  }
}

template <typename scalar_t>
PRIVFAST_CLONES void scale_store(scalar_t* out, const at::opmath_type<scalar_t>* acc, at::opmath_type<scalar_t> scale,
                                 int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(scale * acc[j]);
}

// Normal pairs of groups [first_group, first_group + count) into z[2 * count].
PRIVFAST_CLONES static void normal_pairs(double* z, uint64_t first_group, int64_t count, uint64_t seed,
                                         uint64_t offset) {
  for (int64_t g = 0; g < count; ++g) {
    philox::normal_pair(seed, offset, first_group + static_cast<uint64_t>(g), &z[2 * g], &z[2 * g + 1]);
  }
}

template <typename acc_t>
void fill_noise(acc_t* acc, int64_t first, int64_t n, double noise_std, uint64_t seed, uint64_t offset) {
  if (noise_std == 0.0) {
    for (int64_t j = 0; j < n; ++j) acc[j] = acc_t(0);
    return;
  }
  double z[2 * kNoiseBlock];
  const int64_t end = first + n;
  for (int64_t group = first >> 1; 2 * group < end; group += kNoiseBlock) {
    const int64_t count = std::min<int64_t>(kNoiseBlock, (end + 1) / 2 - group);
    normal_pairs(z, static_cast<uint64_t>(group), count, seed, offset);
    const int64_t lo = std::max<int64_t>(first, 2 * group), hi = std::min<int64_t>(end, 2 * (group + count));
    for (int64_t e = lo; e < hi; ++e) acc[e - first] = static_cast<acc_t>(noise_std * z[e - 2 * group]);
  }
}

#define PRIVFAST_INSTANTIATE(T)                                                                   \
  template double dot<T>(const T*, const T*, int64_t);                                           \
  template double sum_squares<T>(const T*, int64_t);                                             \
  template void accumulate_rows<T>(at::opmath_type<T>*, const at::opmath_type<T>*, const T*, int64_t, int64_t,  \
                                  int64_t);                                                         \
  template void scale_store<T>(T*, const at::opmath_type<T>*, at::opmath_type<T>, int64_t);
PRIVFAST_INSTANTIATE(float)
PRIVFAST_INSTANTIATE(double)
PRIVFAST_INSTANTIATE(c10::Half)
PRIVFAST_INSTANTIATE(c10::BFloat16)
template void fill_noise<float>(float*, int64_t, int64_t, double, uint64_t, uint64_t);
template void fill_noise<double>(double*, int64_t, int64_t, double, uint64_t, uint64_t);

}  // namespace cpu
}  // namespace privfast
