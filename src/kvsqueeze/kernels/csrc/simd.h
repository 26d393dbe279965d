// Portable SIMD helpers (GCC/Clang vector extensions; 16 floats per vector, one AVX-512
// register or two AVX2 ones): unpacking planar codes, a vectorized exp, horizontal sums.
//
// Instruction sets are chosen when the kernel is compiled (-march=native, the build digest covers
// the CPU's flags): KVSQ_AVX512 (AVX-512 F/BW/VBMI: codes unpacked to bytes with byte permutes,
// codebook levels through a 16-entry register table) and KVSQ_VNNI (AVX-512 VNNI: int8 key dot
// products). Whether the int8 key dots run is decided at run time (dispatch.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define KVSQ_AVX512 1
#endif
#if defined(KVSQ_AVX512) && defined(__AVX512VNNI__)
#define KVSQ_VNNI 1
#endif
#if defined(__AVX2__)
#define KVSQ_AVX2 1
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

// x in every lane (a broadcast: `vf{} + x` would keep a scalar add, 0 + x not being x for -0).
inline vf vsplat(float x) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_set1_ps(x);
  vf out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
#else
  vf out;
  for (int i = 0; i < kLanes; ++i) out[i] = x;
  return out;
#endif
}

// x rounded to the nearest integer (ties to even), for |x| < 2^22.
inline vf vround(vf x) {
  const vf magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  return (x + magic) - magic;
}

inline float hmax(vf v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  return _mm512_reduce_max_ps(x);
#else
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = m > v[i] ? m : v[i];
  return m;
#endif
}

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

#if defined(__AVX512F__)
inline vf as_vf(__m512 x) {
  vf out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
#endif

// f(std::integral_constant<int, 0>{}), ..., f(std::integral_constant<int, N - 1>{}): loops whose
// index must be a compile-time constant (intrinsics taking immediates).
template <int N, typename F>
inline void static_for(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f(std::integral_constant<int, I>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

#if defined(KVSQ_AVX512)
// Byte permutations of 3-bit codes_u8: gather[h] puts the three plane bytes of word 8 h + j into
// qword j; out[r] takes channel c = 64 r + i from (word j = c % w, code k = c / w).
template <int D>
struct Unpack3 {
  alignas(64) uint8_t gather[2][64] = {};
  alignas(64) uint8_t out[2][64] = {};
  Unpack3() {
    constexpr int w = D / 8;
    for (int half = 0; half < D / 64; ++half)
      for (int j = 0; j < 8; ++j)
        for (int k = 0; k < 8; ++k) gather[half][j * 8 + k] = static_cast<uint8_t>(k < 3 ? k * w + half * 8 + j : 63);
    for (int c = 0; c < D; ++c) {
      const int k = c / w, j = c % w;
      out[c / 64][c % 64] = static_cast<uint8_t>((j / 8) * 64 + (j % 8) * 8 + k);
    }
  }
};

template <int D>
inline const Unpack3<D>& unpack3_tables() {
  static const Unpack3<D> tables;
  return tables;
}

// One token's codes (planar layout, kvsqueeze/quant/packing.py) as D bytes in channel order, in
// D / 64 registers.
template <int D, int BITS>
inline void codes_u8(const uint8_t* p, __m512i* z) {
  static_assert(D == 64 || D == 128, "codes_u8: head_dim 64 or 128");
  if constexpr (BITS == 8) {
    z[0] = _mm512_loadu_si512(p);
    if constexpr (D == 128) z[1] = _mm512_loadu_si512(p + 64);
  } else if constexpr (BITS == 4) {  // byte j: channel j (low nibble), channel j + D/2 (high)
    const __m512i m = _mm512_set1_epi8(0x0F);
    if constexpr (D == 64) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      z[0] = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1), m);
    } else {
      const __m512i b = _mm512_loadu_si512(p);
      z[0] = _mm512_and_si512(b, m);
      z[1] = _mm512_and_si512(_mm512_srli_epi16(b, 4), m);
    }
  } else if constexpr (BITS == 2) {  // byte j: channels j + k D/4 at bits 2k
    const __m512i m = _mm512_set1_epi8(0x03);
    if constexpr (D == 64) {
      const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m512i shift = _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0);  // per 128-bit lane k: 2k
      z[0] = _mm512_and_si512(_mm512_srlv_epi64(b, shift), m);
    } else {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 2), 1);
      z[0] = _mm512_and_si512(lo, m);
      z[1] = _mm512_and_si512(_mm512_srli_epi16(lo, 4), m);
    }
  } else {  // 3 bits: channel k w + j (w = D / 8) is bits 3k..3k+2 of the 24-bit word of the three
            // byte planes' byte j. Gather each word into a qword, pick the 8 codes with one multishift,
            // then transpose (qword j, byte k) -> channel k w + j.
    static_assert(BITS == 3, "codes_u8: 2, 3, 4 or 8 bits");
    const Unpack3<D>& t = unpack3_tables<D>();
    const __m512i b = _mm512_maskz_loadu_epi8((__mmask64(1) << (3 * D / 8)) - 1, p);
    const __m512i pick = _mm512_set1_epi64(0x15120F0C09060300LL);  // bit offsets 0, 3, ..., 21
    const __m512i m = _mm512_set1_epi8(0x07);
    __m512i words[2];
    for (int half = 0; half < D / 64; ++half)
      words[half] = _mm512_multishift_epi64_epi8(pick, _mm512_permutexvar_epi8(_mm512_load_si512(t.gather[half]), b));
    for (int r = 0; r < D / 64; ++r) {
      const __m512i idx = _mm512_load_si512(t.out[r]);
      z[r] = _mm512_and_si512(
          D == 64 ? _mm512_permutexvar_epi8(idx, words[0]) : _mm512_permutex2var_epi8(words[0], idx, words[1]), m);
    }
  }
}

// Lanes 16 c .. 16 c + 15 of the codes as int32.
template <int C>
inline __m512i code_lanes(const __m512i* z) {
  return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(z[C / 4], C % 4));
}

// The 16 horizontal sums of v[0..15] (int32), as one vector (out[i] = sum of the lanes of v[i]).
inline __m512i hsum16_epi32(const __m512i* x) {
  __m512i a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

#endif

}  // namespace kvsqueeze
