#include "simd.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "../common/philox.h"

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define PRIVFAST_X86 1
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

// total += the lanes' partial sums, in lane order. A row shorter than the lanes (a bias) never filled
// them: all zero, they would change no bit, so their sum is skipped.
template <typename acc_t>
inline void add_lanes(double& total, const acc_t* lanes, int64_t n) {
  if (n < kLanes) return;
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(lanes[l]);
}
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
  add_lanes(total, lanes, n);
  return total;
}

template <typename scalar_t>
PRIVFAST_CLONES std::array<double, 3> cosine_sums(const scalar_t* a, const scalar_t* r, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t ar[kLanes] = {}, aa[kLanes] = {}, rr[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t u = static_cast<acc_t>(a[j + l]), v = static_cast<acc_t>(r[j + l]);
      ar[l] += u * v;
      aa[l] += u * u;
      rr[l] += v * v;
    }
  }
  std::array<double, 3> total = {0, 0, 0};
  for (; j < n; ++j) {
    const double u = static_cast<double>(a[j]), v = static_cast<double>(r[j]);
    total[0] += u * v;
    total[1] += u * u;
    total[2] += v * v;
  }
  add_lanes(total[0], ar, n);
  add_lanes(total[1], aa, n);
  add_lanes(total[2], rr, n);
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
  add_lanes(total, lanes, n);
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

namespace {

// The Philox words of groups [first_group, first_group + count) into w[i][g] (word i of group g).
void stream_words(uint32_t (*w)[kNoiseBlock], uint64_t first_group, int64_t from, int64_t count, uint64_t seed,
                  uint64_t offset) {
  for (int64_t g = from; g < count; ++g) {
    const philox::Words r = philox::stream_words(seed, offset, first_group + static_cast<uint64_t>(g));
    for (int i = 0; i < 4; ++i) w[i][g] = r.w[i];
  }
}

#if defined(PRIVFAST_X86)
// Eight lanes' 32x32 -> 64-bit products with a constant, as (low words, high words).
__attribute__((target("avx2"))) inline void mulhilo8(__m256i m, __m256i a, __m256i* lo, __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6 as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Philox's ten rounds on V independent vectors of eight counters each (c[v] holds their four words),
// interleaved round by round: one vector alone waits on each round's multiply latency. Integer
// arithmetic only, so the words are those of philox::stream_words bit for bit; GCC's own
// vectorization of that loop spends most of its instructions shuffling 32-bit lanes into and out of
// 64-bit products.
template <int V>
__attribute__((target("avx2"))) inline void philox_rounds8(__m256i (&c)[V][4], uint64_t seed) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      __m256i lo0, hi0, lo1, hi1;
      mulhilo8(m0, c[v][0], &lo0, &hi0);
      mulhilo8(m1, c[v][2], &lo1, &hi1);
      c[v][0] = _mm256_xor_si256(_mm256_xor_si256(hi1, c[v][1]), key0);
      c[v][1] = lo1;
      c[v][2] = _mm256_xor_si256(_mm256_xor_si256(hi0, c[v][3]), key1);
      c[v][3] = lo0;
    }
    k0 += philox::kW0;
    k1 += philox::kW1;
  }
}

// stream_words eight counters a vector, V vectors at a time; returns the groups done (a multiple of 8 * V).
template <int V>
__attribute__((target("avx2"))) int64_t stream_words_avx2(uint32_t (*w)[kNoiseBlock], uint64_t first_group,
                                                         int64_t from, int64_t count, uint64_t seed, uint64_t offset) {
  const __m256i offset_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m256i offset_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t g = from;
  for (; g + 8 * V <= count; g += 8 * V) {
    const uint64_t group = first_group + static_cast<uint64_t>(g);
    // The counters of one pass share their high word unless the low word wraps inside them.
    if (static_cast<uint32_t>(group) > 0xFFFFFFFFu - (8u * V - 1u)) break;
    __m256i c[V][4];
    for (int v = 0; v < V; ++v) {
      const __m256i low = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(group) + 8u * v));
      c[v][0] = _mm256_add_epi32(low, lanes);
      c[v][1] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(group >> 32)));
      c[v][2] = offset_lo;
      c[v][3] = offset_hi;
    }
    philox_rounds8<V>(c, seed);
    for (int v = 0; v < V; ++v) {
      for (int i = 0; i < 4; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(&w[i][g + 8 * v]), c[v][i]);
    }
  }
  return g;
}

// GCC 12's AVX-512 shift intrinsics start from _mm512_undefined_epi32(), which -Wmaybe-uninitialized
// reports as a read of an uninitialized value; every lane is written.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Sixteen lanes' 32x32 -> 64-bit products with a constant, as mulhilo8 does for eight.
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i m, __m512i a, __m512i* lo, __m512i* hi) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// Philox's ten rounds on V independent vectors of sixteen counters each (c[v] holds their four words),
// interleaved round by round: one vector alone waits on each round's multiply latency.
template <int V>
__attribute__((target("avx512f"))) inline void philox_rounds16(__m512i (&c)[V][4], uint64_t seed) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox::kM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      __m512i lo0, hi0, lo1, hi1;
      mulhilo16(m0, c[v][0], &lo0, &hi0);
      mulhilo16(m1, c[v][2], &lo1, &hi1);
      c[v][0] = _mm512_xor_si512(_mm512_xor_si512(hi1, c[v][1]), key0);
      c[v][1] = lo1;
      c[v][2] = _mm512_xor_si512(_mm512_xor_si512(hi0, c[v][3]), key1);
      c[v][3] = lo0;
    }
    k0 += philox::kW0;
    k1 += philox::kW1;
  }
}

// stream_words_avx2's passes with sixteen counters a vector, V vectors at a time, for the machines that have AVX-512:
// the same integer operations, so the same words. Returns the groups done (a multiple of 16 * V).
template <int V>
__attribute__((target("avx512f"))) int64_t stream_words_avx512(uint32_t (*w)[kNoiseBlock], uint64_t first_group,
                                                              int64_t from, int64_t count, uint64_t seed,
                                                              uint64_t offset) {
  const __m512i offset_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m512i offset_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t g = from;
  for (; g + 16 * V <= count; g += 16 * V) {
    const uint64_t group = first_group + static_cast<uint64_t>(g);
    // The counters of one pass share their high word unless the low word wraps inside them.
    if (static_cast<uint32_t>(group) > 0xFFFFFFFFu - (16u * V - 1u)) break;
    __m512i c[V][4];
    for (int v = 0; v < V; ++v) {
      const __m512i low = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(group) + 16u * v));
      c[v][0] = _mm512_add_epi32(low, lanes);
      c[v][1] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(group >> 32)));
      c[v][2] = offset_lo;
      c[v][3] = offset_hi;
    }
    philox_rounds16<V>(c, seed);
    for (int v = 0; v < V; ++v) {
      for (int i = 0; i < 4; ++i) _mm512_storeu_si512(&w[i][g + 16 * v], c[v][i]);
    }
  }
  return g;
}

#pragma GCC diagnostic pop

// The widest Philox path this CPU runs: 2 AVX-512, 1 AVX2, 0 scalar. PRIVFAST_CPU_ISA=avx2 or scalar
// lowers it, so that a machine with AVX-512 can test the narrower paths against the reference too.
int philox_width() {
  int width = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  if (const char* cap = std::getenv("PRIVFAST_CPU_ISA")) {
    const std::string name(cap);
    width = std::min(width, name == "scalar" ? 0 : name == "avx2" ? 1 : 2);
  }
  return width;
}
const int kPhiloxWidth = philox_width();
#endif

// Normal pairs from their words, in loops short enough that consecutive groups overlap in the
// out-of-order core (one loop over the whole transform is bound by the latency of its long
// dependency chain); the same operations as philox::normal_pair, so the same bits.
PRIVFAST_CLONES void normals_from_words(double* z, const uint32_t (*w)[kNoiseBlock], int64_t count) {
  double radius[kNoiseBlock];
  for (int64_t g = 0; g < count; ++g) radius[g] = philox::radius_of(w[0][g], w[1][g]);
  for (int64_t g = 0; g < count; ++g) {
    double sin_t, cos_t;
    philox::angle_of(w[2][g], w[3][g], &sin_t, &cos_t);
    z[2 * g] = philox::mul(radius[g], cos_t);
    z[2 * g + 1] = philox::mul(radius[g], sin_t);
  }
}

}  // namespace

// Normal pairs of groups [first_group, first_group + count) into z[2 * count], count <= kNoiseBlock.
static void normal_pairs(double* z, uint64_t first_group, int64_t count, uint64_t seed, uint64_t offset) {
  uint32_t w[4][kNoiseBlock];
#if defined(PRIVFAST_X86)
  if (kPhiloxWidth == 2) {
    const int64_t done = stream_words_avx512<4>(w, first_group, 0, count, seed, offset);
    stream_words(w, first_group, stream_words_avx512<1>(w, first_group, done, count, seed, offset), count, seed, offset);
  } else if (kPhiloxWidth == 1) {
    const int64_t done = stream_words_avx2<4>(w, first_group, 0, count, seed, offset);
    stream_words(w, first_group, stream_words_avx2<1>(w, first_group, done, count, seed, offset), count, seed, offset);
  } else {
    stream_words(w, first_group, 0, count, seed, offset);
  }
#else
  stream_words(w, first_group, 0, count, seed, offset);
#endif
  normals_from_words(z, w, count);
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
  template std::array<double, 3> cosine_sums<T>(const T*, const T*, int64_t);                     \
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
