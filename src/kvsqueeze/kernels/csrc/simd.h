// Portable SIMD helpers (GCC/Clang vector extensions; 16 floats per vector, one AVX-512
// register or two AVX2 ones): unpacking planar codes, a vectorized exp, horizontal sums.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace kvsqueeze {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

inline vf vsplat(float x) { return vf{} + x; }

inline float hsum(vf v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  return _mm512_reduce_add_ps(x);
#else
  typedef float vf8 __attribute__((vector_size(32)));
  typedef float vf4 __attribute__((vector_size(16)));
  vf8 a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
  a += b;
  vf4 c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
#endif
}

// The 16 horizontal sums of v[0..15], as one vector (out[i] = sum of the lanes of v[i]).
inline vf hsum16(const vf* v) {
#if defined(__AVX512F__)
  __m512 x[16], a[8], b[4], c[2];
  std::memcpy(x, v, sizeof(x));
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the four sums of four vectors
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i)  // across 128-bit lanes
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  vf out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
#else
  vf out;
  for (int i = 0; i < kLanes; ++i) out[i] = hsum(v[i]);
  return out;
#endif
}

// 16 bytes -> 16 int32 lanes (zero-extended).
inline vi widen(const uint8_t* p) {
  vi out;
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&out, &w, sizeof(out));
#elif defined(__AVX2__)
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i lo = _mm256_cvtepu8_epi32(x), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(x, 8));
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
#else
  for (int i = 0; i < kLanes; ++i) out[i] = p[i];
#endif
  return out;
}

// Codes of one token, planar layout (kvsqueeze/quant/packing.py), as D / 16 float vectors in
// channel order. Each byte plane (D * BITS / 8 bytes... one per code position k) must hold
// whole vectors: D / (8 / BITS) a multiple of 16.
template <int D, int BITS>
inline void unpack_codes(const uint8_t* p, vf* out) {
  constexpr int n = 8 / BITS, plane = D / n, chunks = plane / kLanes;
  static_assert(plane % kLanes == 0, "byte planes must hold whole vectors");
  for (int m = 0; m < chunks; ++m) {
    const vi bytes = widen(p + m * kLanes);
    for (int k = 0; k < n; ++k) {
      const vi c = BITS == 8 ? bytes : (bytes >> (k * BITS)) & ((1 << BITS) - 1);
      out[k * chunks + m] = __builtin_convertvector(c, vf);
    }
  }
}

// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp); 0 below -87 (and for -inf).
inline vf vexp(vf x) {
  const vf lo = vsplat(-87.0f);
  const vi dead = x < lo;
  x = x < lo ? lo : x;
  const vf magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf z = r * r;
  vf y = vsplat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  const vf res = y * pow2;
  return dead ? vf{} : res;
}

}  // namespace kvsqueeze
