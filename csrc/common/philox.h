// Counter-based Gaussian noise shared by the CPU and CUDA kernels: Philox4x32-10 (Salmon et al.,
// SC'11) and Box-Muller, keyed by (seed, offset, element index).
//
// Bit-identical noise on every device is the contract (the Python reference in
// privfast/_reference.py mirrors this file operation for operation), so the transcendental part
// does not call libm or CUDA's math library, whose last-bit rounding differs: log, sin and cos are
// short series in plain IEEE double arithmetic, and on the device every product and sum goes through
// __dmul_rn / __dadd_rn so that nvcc cannot contract them into fused multiply-adds (the host build
// uses -ffp-contract=off for the same reason).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define PF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PF_HOST_DEVICE inline
#endif

namespace privfast {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
// Each counter gives four 32-bit words = two 53-bit uniforms = one Box-Muller pair.
constexpr int64_t kNormalsPerCounter = 2;

struct Words {
  uint32_t w[4];
};

PF_HOST_DEVICE uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

PF_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Words{{c0, c1, c2, c3}};
}

PF_HOST_DEVICE double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

PF_HOST_DEVICE double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

PF_HOST_DEVICE double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// Integer in [0, 2^53) from the top 27 bits of one word and the top 26 of another, as a double.
// Built from two int32 conversions (exact, and vectorizable where int64 -> double is not).
PF_HOST_DEVICE double uniform53(uint32_t high_word, uint32_t low_word) {
  const double high = static_cast<double>(static_cast<int32_t>(high_word >> 5));
  const double low = static_cast<double>(static_cast<int32_t>(low_word >> 6));
  return add(mul(high, 67108864.0), low);  // high * 2^26 + low, exact below 2^53
}

// Horner evaluation of sum_i c[i] * x2^i, highest term first.
template <int N>
PF_HOST_DEVICE double horner(double x2, const double (&c)[N]) {
  double acc = c[N - 1];
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC unroll 16
#endif
  for (int i = N - 2; i >= 0; --i) acc = add(mul(acc, x2), c[i]);
  return acc;
}

// log(u) for u in (0, 1]: exponent times ln 2, plus 2*atanh(s) for the mantissa.
//
// u = m * 2^e with m in [sqrt(1/2), sqrt(2)), taken apart in its bits (what frexp does, without
// libm; the uniforms here are >= 2^-53, never subnormal). Every choice is an integer select on the
// bits and the exponent becomes a double through the bits of 2^52 + e, not an int conversion: GCC
// turns a select between two floating-point computations back into a branch that it will not
// if-convert (without -fno-trapping-math), and AVX2 has no 64-bit int -> double, so either would
// keep loops of draws from vectorizing.
PF_HOST_DEVICE double log_unit(double u) {
  constexpr double kSqrtHalf = 0.7071067811865476;  // repr(math.sqrt(0.5)), as the reference uses
  constexpr double kLn2 = 0.6931471805599453;  // repr(math.log(2.0))
  constexpr double kTwoPow52 = 4503599627370496.0;
  constexpr uint64_t kExponentBits = static_cast<uint64_t>(0x7FF) << 52;
  constexpr double kSeries[14] = {1.0,        1.0 / 3.0,  1.0 / 5.0,  1.0 / 7.0,  1.0 / 9.0,
                                  1.0 / 11.0, 1.0 / 13.0, 1.0 / 15.0, 1.0 / 17.0, 1.0 / 19.0,
                                  1.0 / 21.0, 1.0 / 23.0, 1.0 / 25.0, 1.0 / 27.0};
  union {
    double d;
    uint64_t i;
  } bits, mantissa, biased;
  bits.d = u;
  mantissa.i = (bits.i & ~kExponentBits) | (static_cast<uint64_t>(1022) << 52);  // in [0.5, 1)
  const uint64_t low = mantissa.d < kSqrtHalf ? 1 : 0;
  mantissa.i |= low << 52;  // exponent field 1022 -> 1023: the mantissa times 2, into [sqrt(1/2), 1)
  biased.i = (static_cast<uint64_t>(0x433) << 52) | (((bits.i >> 52) & 0x7FF) - low);
  const double exponent = sub(sub(biased.d, kTwoPow52), 1022.0);  // exact: small integers
  const double s = sub(mantissa.d, 1.0) / add(mantissa.d, 1.0);
  const double series = horner(mul(s, s), kSeries);
  return add(mul(exponent, kLn2), mul(mul(2.0, s), series));
}

// (sin 2*pi*v, cos 2*pi*v) for v in [0, 1): quadrant, then Taylor series on [-pi/4, pi/4).
PF_HOST_DEVICE void sincos_two_pi(double v, double* sin_out, double* cos_out) {
  constexpr double kHalfPi = 1.5707963267948966;  // repr(math.pi / 2)
  constexpr double kSqrtHalf = 0.7071067811865476;
  constexpr double kSin[9] = {1.0,
                              -1.0 / 6.0,
                              1.0 / 120.0,
                              -1.0 / 5040.0,
                              1.0 / 362880.0,
                              -1.0 / 39916800.0,
                              1.0 / 6227020800.0,
                              -1.0 / 1307674368000.0,
                              1.0 / 355687428096000.0};
  constexpr double kCos[10] = {1.0,
                               -1.0 / 2.0,
                               1.0 / 24.0,
                               -1.0 / 720.0,
                               1.0 / 40320.0,
                               -1.0 / 3628800.0,
                               1.0 / 479001600.0,
                               -1.0 / 87178291200.0,
                               1.0 / 20922789888000.0,
                               -1.0 / 6402373705728000.0};
  const double v4 = mul(v, 4.0);
  const double quadrant = static_cast<double>(static_cast<int>(v4));  // v4 >= 0: truncation is floor
  const double x = mul(sub(sub(v4, quadrant), 0.5), kHalfPi);
  const double x2 = mul(x, x);
  const double sin_x = mul(x, horner(x2, kSin));
  const double cos_x = horner(x2, kCos);
  const double s = mul(add(cos_x, sin_x), kSqrtHalf);  // sin(pi/4 + x)
  const double c = mul(sub(cos_x, sin_x), kSqrtHalf);  // cos(pi/4 + x)
  // Rotate by the quadrant: odd quadrants swap (s, c) -> (c, -s); quadrants 2 and 3 negate both.
  const int q = static_cast<int>(quadrant);
  const double sin_q = (q & 1) ? c : s;
  const double cos_q = (q & 1) ? -s : c;
  *sin_out = (q & 2) ? -sin_q : sin_q;
  *cos_out = (q & 2) ? -cos_q : cos_q;
}

// The Philox words of counter `group` of the stream (seed, offset).
PF_HOST_DEVICE Words stream_words(uint64_t seed, uint64_t offset, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), static_cast<uint32_t>(offset),
                       static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

constexpr double kTwoPowMinus53 = 1.1102230246251565e-16;

// Box-Muller's radius sqrt(-2 log u1), u1 in (0, 1] from words 0 and 1 of a counter.
PF_HOST_DEVICE double radius_of(uint32_t w0, uint32_t w1) {
  const double u1 = mul(add(uniform53(w0, w1), 1.0), kTwoPowMinus53);  // (0, 1]
  return sqrt(mul(-2.0, log_unit(u1)));
}

// Box-Muller's angle 2*pi*u2 as (sin, cos), u2 in [0, 1) from words 2 and 3 of a counter.
PF_HOST_DEVICE void angle_of(uint32_t w2, uint32_t w3, double* sin_t, double* cos_t) {
  sincos_two_pi(mul(uniform53(w2, w3), kTwoPowMinus53), sin_t, cos_t);
}

// The normal pair of counter `group` of the stream (seed, offset): elements 2*group and 2*group+1.
PF_HOST_DEVICE void normal_pair(uint64_t seed, uint64_t offset, uint64_t group, double* z0, double* z1) {
  const Words r = stream_words(seed, offset, group);
  const double radius = radius_of(r.w[0], r.w[1]);
  double sin_t, cos_t;
  angle_of(r.w[2], r.w[3], &sin_t, &cos_t);
  *z0 = mul(radius, cos_t);
  *z1 = mul(radius, sin_t);
}

// Element `index` of the stream (seed, offset).
PF_HOST_DEVICE double normal(uint64_t seed, uint64_t offset, uint64_t index) {
  double z0, z1;
  normal_pair(seed, offset, index >> 1, &z0, &z1);
  return (index & 1) ? z1 : z0;
}

}  // namespace philox
}  // namespace privfast
