// Fast tile reader: integer keys grouped per channel (2, 3, 4 or 8 bits; post- or pre-RoPE), integer
// or codebook values grouped per token (2, 3, 4 or 8 bits, groups a multiple of 16 channels), head_dim
// D in {64, 128}, no outliers (those sources take the generic reader). Codes are unpacked in
// registers (AVX-512: bytes in channel order with byte permutes, see simd.h) and never written out.
//
// Keys, one of four modes per segment (`KeyMode`):
//   float  q . k_t = sum_d (q_d s_d) c_td + sum_d q_d o_d, with s, o shared by a group of tokens, so
//          q (.) s and q . o are computed once per group: one FMA per code and row;
//   int8   q (.) s quantized to int8 per row and key group (scale a = max |q s| / 127), then
//          a * sum_d q8_d c_td + q . o with integer dot products (VNNI or AVX2, dispatch.h);
//   rope   pre-RoPE keys: k_t = c_t (.) s + o dequantized in registers, RoPE applied at the token's
//          cache position (a row of the RoPE table), then dotted (float);
// 16 token scores are reduced with one transposed horizontal sum.
// Values: sum_t p_t (v(c_td) s_tg + o_tg) = sum_t (p_t s_tg) v(c_td) + sum_t p_t o_tg, v the code or
// its codebook level (one register permute, 16 levels in a register); the second term accumulated per
// channel group (zacc) and added once per segment. (o is the zero point, or -mid * s for symmetric
// integer codes, 0 for symmetric codebooks.) Up to 4 query rows are processed per pass with their
// accumulators in registers, so each token's codes are unpacked once per pass.
// Paged sources are read block by block (`Cursor`); the non-paged ones as one span per (b, h).
#pragma once

#include <algorithm>

#include "decode.h"
#include "dispatch.h"
#include "online_softmax.h"
#include "simd.h"

namespace kvsqueeze {

constexpr int kRowsPerPass = 4;
enum class KeyMode { kFloat, kInt8, kRope, kExact };

// Pseudo bit widths of exact rows for decode_token: float16, bfloat16, float32 values.
constexpr int kF16 = 16, kBF16 = 17, kF32 = 32;

inline bool exact_row_dtype(const Source& s) {
  return s.kind == kExact && (s.data.dtype == at::kHalf || s.data.dtype == at::kBFloat16 || s.data.dtype == at::kFloat);
}
inline int exact_bits(const Source& s) {
  return s.data.dtype == at::kHalf ? kF16 : s.data.dtype == at::kBFloat16 ? kBF16 : kF32;
}

inline bool fast_bits(int64_t bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

inline bool packed_fast_path(const Source& k, const Source& v, int64_t D) {
  if (exact_row_dtype(k) && exact_row_dtype(v)) return D == 64 || D == 128;  // exact rows (sinks, windows, classes)
  return (D == 64 || D == 128) && k.kind == kInt && k.axis == 1 && !k.has_outliers && fast_bits(k.bits) &&
         !(k.rot != nullptr && k.rope != nullptr) && (v.kind == kInt || v.kind == kCodebook) && v.axis == 0 &&
         !v.has_outliers && fast_bits(v.bits) && v.group % kLanes == 0 && D % v.group == 0;
}

// The span of a source holding the current tile; paged, also the next block's, whose rows the
// reader prefetches a block ahead, a tile at a time: scattered blocks break the hardware
// prefetcher's stream at every block (measured: +35% time at 8 x 4096 tokens, beyond L2, vs +10%
// with the prefetch). Not when the next block directly follows this one (the stream goes on).
struct Cursor {
  const Source& src;
  int64_t b, h, e;  // (b, h), tokens before e
  Span cur, next;
  bool stream = false;  // next follows cur in memory

  Cursor(const Source& s, int64_t b_, int64_t h_, int64_t e_) : src(s), b(b_), h(h_), e(e_) {}

  void seek(int64_t t) {
    if (t < cur.end) return;
    cur = t >= next.first && t < next.end ? next : src.span(b, h, t);
    next = src.paged() && cur.end < e ? src.span(b, h, cur.end) : Span{};
    stream = next.data == cur.data + src.block * src.data.row_bytes();
  }

  // Prefetch the rows of the next block at the offsets of tokens [t, t + n) of this one (the
  // per-channel scale rows with the block's first tile).
  void prefetch(int64_t t, int64_t n) const {
    if (next.data == nullptr || stream) return;
    const int64_t i = t - cur.first;
    lines(next.data + i * src.data.row_bytes(), n * src.data.row_bytes());
    const int64_t r = src.axis == 1 ? (i == 0 ? 0 : -1) : i, m = src.axis == 1 ? src.scale_block : n;
    if (r < 0) return;
    lines(next.scale + r * src.scale.row_bytes(), m * src.scale.row_bytes());
    if (next.zero) lines(next.zero + r * src.zero.row_bytes(), m * src.zero.row_bytes());
  }

  static void lines(const char* p, int64_t bytes) {
    asm volatile("" : "+r"(p));  // a side effect: else GCC finds this function const and drops its calls
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
  }
};

// The 16 codebook levels of a source (its first 2**bits entries used), or null for integer codes.
struct Levels {
  const float* p = nullptr;
#if defined(KVSQ_AVX512)
  __m512 z = _mm512_setzero_ps();
#endif
  explicit Levels(const float* levels16) : p(levels16) {
#if defined(KVSQ_AVX512)
    if (p) z = _mm512_loadu_ps(p);
#endif
  }
};

// One exact row (BITS kF16 / kBF16 / kF32) as D / 16 float vectors.
template <int D, int BITS>
inline void decode_exact(const uint8_t* p, vf* out) {
  constexpr int C = D / kLanes;
  for (int c = 0; c < C; ++c) {
    if constexpr (BITS == kF32) {
      out[c] = vload(reinterpret_cast<const float*>(p) + c * kLanes);
    } else if constexpr (BITS == kF16) {
#if defined(__AVX512F__)
      out[c] = as_vf(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p) + c)));
#else
      for (int i = 0; i < kLanes; ++i) out[c][i] = static_cast<float>(reinterpret_cast<const at::Half*>(p)[c * kLanes + i]);
#endif
    } else {  // bfloat16: the high half of a float32
      typedef uint16_t vh __attribute__((vector_size(32)));
      vh x;
      std::memcpy(&x, p + c * 32, sizeof(x));
      const vi bits = __builtin_convertvector(x, vi) << 16;
      std::memcpy(&out[c], &bits, sizeof(vf));
    }
  }
}

// One token's codes as D / 16 float vectors in channel order: the codes, or their levels (LUT); or
// an exact row (BITS kF16 / kBF16 / kF32).
template <int D, int BITS, bool LUT>
inline void decode_token(const uint8_t* p, const Levels& lev, vf* out) {
  constexpr int C = D / kLanes;
  if constexpr (BITS >= kF16) {
    decode_exact<D, BITS>(p, out);
  } else {
#if defined(KVSQ_AVX512)
    __m512i z[D / 64];
    codes_u8<D, BITS>(p, z);
    static_for<C>([&](auto c) {
      const __m512i idx = code_lanes<decltype(c)::value>(z);
      out[c] = as_vf(LUT ? _mm512_permutexvar_ps(idx, lev.z) : _mm512_cvtepi32_ps(idx));
    });
#else
    alignas(64) uint8_t codes[D];
    unpack_bytes(p, BITS, D, codes);
    for (int c = 0; c < C; ++c) {
      const vi x = widen(codes + c * kLanes);
      if constexpr (LUT) {
        for (int i = 0; i < kLanes; ++i) out[c][i] = lev.p[x[i]];
      } else {
        out[c] = __builtin_convertvector(x, vf);
      }
    }
#endif
  }
}

// What a score function needs beyond the codes: per token of the tile, its RoPE table row (rope mode).
struct KeyTile {
  const float* cs[kTile];
};

// Scores of rows [r, r + NR) for n tokens of codes kc (row stride kst bytes), into st.sc; float,
// rope and exact modes. (+ st.qo in float mode; rope mode dequantizes the keys, offsets included;
// exact rows (KB kF16 / kBF16 / kF32) are dotted with the query as they are.)
template <int D, int KB, int NR, bool ROPE>
void score_rows_float(const uint8_t* kc, int64_t kst, int64_t n, int64_t r, const KeyTile& kt, RowState& st) {
  constexpr int C = D / kLanes, H = C / 2;
  constexpr bool EXACT = KB >= kF16;
  const float* qsrc = ROPE || EXACT ? st.q.data() : st.qs.data();
  vf qs[NR][C];
  for (int i = 0; i < NR; ++i)
    for (int c = 0; c < C; ++c) qs[i][c] = vload(qsrc + (r + i) * D + c * kLanes);
  vf ks[ROPE ? C : 1], ko[ROPE ? C : 1];
  if constexpr (ROPE)
    for (int c = 0; c < C; ++c) ks[c] = vload(st.ks.data() + c * kLanes), ko[c] = vload(st.ko.data() + c * kLanes);
  const Levels none(nullptr);
  vf kv[C], part[NR][kLanes];
  for (int64_t t0 = 0; t0 < n; t0 += kLanes) {  // 16 tokens, then one transposed horizontal sum
    const int64_t m = std::min<int64_t>(kLanes, n - t0);
    for (int64_t j = 0; j < kLanes; ++j) {
      if (j >= m) {
        for (int i = 0; i < NR; ++i) part[i][j] = vf{};
        continue;
      }
      decode_token<D, KB, false>(kc + (t0 + j) * kst, none, kv);
      if constexpr (ROPE) {  // k = c s + o, then RoPE: rotate_half pairs (d, d + D/2)
        const float* cs = kt.cs[t0 + j];
        for (int c = 0; c < C; ++c) kv[c] = kv[c] * ks[c] + ko[c];
        for (int c = 0; c < H; ++c) {
          const vf cos = vload(cs + c * kLanes), sin = vload(cs + D / 2 + c * kLanes);
          const vf lo = kv[c], hi = kv[c + H];
          kv[c] = lo * cos - hi * sin;
          kv[c + H] = hi * cos + lo * sin;
        }
      }
      for (int i = 0; i < NR; ++i) {
        vf acc = qs[i][0] * kv[0];
        for (int c = 1; c < C; ++c) acc += qs[i][c] * kv[c];
        part[i][j] = acc;
      }
    }
    for (int i = 0; i < NR; ++i) {
      const vf add = ROPE || EXACT ? vf{} : vsplat(st.qo[r + i]);
      vstore(st.score(r + i) + t0, hsum16(part[i]) + add);
    }
  }
}

#if defined(KVSQ_VNNI)
// int8 mode with AVX-512 VNNI: a * sum_d q8_d c_td + q . o.
template <int D, int KB, int NR>
void score_rows_vnni(const uint8_t* kc, int64_t kst, int64_t n, int64_t r, const KeyTile&, RowState& st) {
  constexpr int Z = D / 64;
  __m512i q8[NR][Z];
  for (int i = 0; i < NR; ++i)
    for (int z = 0; z < Z; ++z) q8[i][z] = _mm512_load_si512(st.q8 + (r + i) * D + z * 64);
  __m512i codes[Z], part[NR][kLanes];
  for (int64_t t0 = 0; t0 < n; t0 += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - t0);
    for (int64_t j = 0; j < kLanes; ++j) {
      if (j >= m) {
        for (int i = 0; i < NR; ++i) part[i][j] = _mm512_setzero_si512();
        continue;
      }
      codes_u8<D, KB>(kc + (t0 + j) * kst, codes);
      for (int i = 0; i < NR; ++i) {
        __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[0], q8[i][0]);
        if constexpr (Z == 2) acc = _mm512_dpbusd_epi32(acc, codes[1], q8[i][1]);
        part[i][j] = acc;
      }
    }
    for (int i = 0; i < NR; ++i) {
      const __m512 sums = _mm512_cvtepi32_ps(hsum16_epi32(part[i]));
      const __m512 s = _mm512_fmadd_ps(sums, _mm512_set1_ps(st.qa[r + i]), _mm512_set1_ps(st.qo[r + i]));
      _mm512_storeu_ps(st.score(r + i) + t0, s);
    }
  }
}
#endif

#if defined(KVSQ_AVX2)
// One token's 2-, 4- or 8-bit codes as D bytes in channel order, in D / 32 AVX2 registers.
template <int D, int BITS>
inline void codes_u8_avx2(const uint8_t* p, __m256i* z) {
  if constexpr (BITS == 8) {
    for (int r = 0; r < D / 32; ++r) z[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * r));
  } else if constexpr (BITS == 4) {  // low nibbles: channels 0 .. D/2 - 1, high: D/2 ..
    const __m256i m = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < D / 64; ++r) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * r));
      z[r] = _mm256_and_si256(b, m);
      z[r + D / 64] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    }
  } else {  // 2 bits: channels k D/4 + j at bits 2k of byte j
    static_assert(BITS == 2, "codes_u8_avx2: 2, 4 or 8 bits");
    const __m256i m = _mm256_set1_epi8(0x03);
    if constexpr (D == 64) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      const __m256i b = _mm256_set_m128i(_mm_srli_epi16(x, 2), x);
      z[0] = _mm256_and_si256(b, m);
      z[1] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    } else {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      for (int k = 0; k < 4; ++k) z[k] = _mm256_and_si256(_mm256_srli_epi16(b, 2 * k), m);
    }
  }
}

// int8 mode with AVX2: u8 x s8 pair sums (vpmaddubsw), then pairs of those (vpmaddwd).
template <int D, int KB, int NR>
void score_rows_avx2(const uint8_t* kc, int64_t kst, int64_t n, int64_t r, const KeyTile&, RowState& st) {
  constexpr int Z = D / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i codes[Z];
  for (int64_t j = 0; j < n; ++j) {
    codes_u8_avx2<D, KB>(kc + j * kst, codes);
    for (int i = 0; i < NR; ++i) {
      const int8_t* q = st.q8 + (r + i) * D;
      __m256i acc = _mm256_setzero_si256();
      for (int z = 0; z < Z; ++z) {
        const __m256i qz = _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32 * z));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes[z], qz), ones));
      }
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      st.score(r + i)[j] = static_cast<float>(_mm_cvtsi128_si32(s)) * st.qa[r + i] + st.qo[r + i];
    }
  }
}
#endif

// acc[r] += sum_t wp[r][g(c)][t] * v(codes_t), wp = weights premultiplied by the token's scales.
template <int D, int VB, bool LUT, int NR>
void accumulate_rows(const uint8_t* vc, int64_t vst, int64_t n, int64_t r, int64_t chunks_per_group,
                     const float* wp, const Levels& lev, RowState& st) {
  constexpr int C = D / kLanes;
  const int group_shift = __builtin_ctzll(chunks_per_group);  // a power of two: 16 x it divides D
  vf acc[NR][C];
  for (int i = 0; i < NR; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = vload(st.acc.data() + (r + i) * D + c * kLanes);
  vf cv[C];
  for (int64_t t = 0; t < n; ++t) {
    decode_token<D, VB, LUT>(vc + t * vst, lev, cv);
    for (int i = 0; i < NR; ++i) {
      const float* w = wp + (r + i) * C * kTile + t;  // (rows, groups, kTile)
      for (int c = 0; c < C; ++c) acc[i][c] += vsplat(w[(c >> group_shift) * kTile]) * cv[c];
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int c = 0; c < C; ++c) vstore(st.acc.data() + (r + i) * D + c * kLanes, acc[i][c]);
}

using ScoreFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const KeyTile&, RowState&);
using ValueFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const float*, const Levels&, RowState&);

// Rows [0, nr) in passes of up to kRowsPerPass rows.
template <template <int> class Fn, typename... Args>
inline void by_passes(int64_t nr, Args&&... args) {
  for (int64_t r = 0; r < nr; r += kRowsPerPass) {
    switch (std::min<int64_t>(kRowsPerPass, nr - r)) {
      case 1: Fn<1>::run(r, args...); break;
      case 2: Fn<2>::run(r, args...); break;
      case 3: Fn<3>::run(r, args...); break;
      default: Fn<4>::run(r, args...); break;
    }
  }
}

template <int D, int KB, KeyMode MODE, int DOT>
struct ScoreRows {
  template <int NR>
  struct Pass {
    static void run(int64_t r, const uint8_t* kc, int64_t kst, int64_t n, const KeyTile& kt, RowState& st) {
      if constexpr (MODE == KeyMode::kInt8) {
#if defined(KVSQ_VNNI)
        if constexpr (DOT == kVnni) return score_rows_vnni<D, KB, NR>(kc, kst, n, r, kt, st);
#endif
#if defined(KVSQ_AVX2)
        if constexpr (DOT == kAvx2 && KB != 3) return score_rows_avx2<D, KB, NR>(kc, kst, n, r, kt, st);
#endif
      } else {
        score_rows_float<D, KB, NR, MODE == KeyMode::kRope>(kc, kst, n, r, kt, st);
      }
    }
  };
  static void all(const uint8_t* kc, int64_t kst, int64_t n, int64_t nr, const KeyTile& kt, RowState& st) {
    by_passes<Pass>(nr, kc, kst, n, kt, st);
  }
};

template <int D, int VB, bool LUT>
struct AccumulateRows {
  template <int NR>
  struct Pass {
    static void run(int64_t r, const uint8_t* vc, int64_t vst, int64_t n, int64_t cpg, const float* wp,
                    const Levels& lev, RowState& st) {
      accumulate_rows<D, VB, LUT, NR>(vc, vst, n, r, cpg, wp, lev, st);
    }
  };
  static void all(const uint8_t* vc, int64_t vst, int64_t n, int64_t nr, int64_t cpg, const float* wp,
                  const Levels& lev, RowState& st) {
    by_passes<Pass>(nr, vc, vst, n, cpg, wp, lev, st);
  }
};

// The fast reader of one segment: its key mode and the specialised score / value functions.
struct FastReader {
  KeyMode mode = KeyMode::kFloat;
  int qmax = 127;  // int8 mode: largest query code
  ScoreFn score = nullptr;
  ValueFn values = nullptr;
  int64_t D = 0;
  explicit operator bool() const { return score != nullptr; }
};

// Score function for key bits KB in `mode` with integer dot `dot`; null when this build cannot.
template <int D, int KB>
ScoreFn pick_score(KeyMode mode, int dot) {
  if constexpr (KB >= kF16) {
    return &ScoreRows<D, KB, KeyMode::kExact, kFloat>::all;
  } else {
    if (mode == KeyMode::kRope) return &ScoreRows<D, KB, KeyMode::kRope, kFloat>::all;
    if (mode == KeyMode::kFloat) return &ScoreRows<D, KB, KeyMode::kFloat, kFloat>::all;
#if defined(KVSQ_VNNI)
    if (dot == kVnni) return &ScoreRows<D, KB, KeyMode::kInt8, kVnni>::all;
#endif
#if defined(KVSQ_AVX2)
    if constexpr (KB != 3)
      if (dot == kAvx2) return &ScoreRows<D, KB, KeyMode::kInt8, kAvx2>::all;
#endif
    return nullptr;
  }
}

template <int D>
ScoreFn pick_score_bits(int64_t kb, KeyMode mode, int dot) {
  switch (kb) {
    case kF16: return pick_score<D, kF16>(mode, dot);
    case kBF16: return pick_score<D, kBF16>(mode, dot);
    case kF32: return pick_score<D, kF32>(mode, dot);
    case 2: return pick_score<D, 2>(mode, dot);
    case 3: return pick_score<D, 3>(mode, dot);
    case 4: return pick_score<D, 4>(mode, dot);
    default: return pick_score<D, 8>(mode, dot);
  }
}

template <int D>
ValueFn pick_values(int64_t vb, bool lut) {
  switch (vb) {
    case kF16: return &AccumulateRows<D, kF16, false>::all;
    case kBF16: return &AccumulateRows<D, kBF16, false>::all;
    case kF32: return &AccumulateRows<D, kF32, false>::all;
    case 2: return lut ? &AccumulateRows<D, 2, true>::all : &AccumulateRows<D, 2, false>::all;
    case 3: return lut ? &AccumulateRows<D, 3, true>::all : &AccumulateRows<D, 3, false>::all;
    case 4: return lut ? &AccumulateRows<D, 4, true>::all : &AccumulateRows<D, 4, false>::all;
    default: return &AccumulateRows<D, 8, false>::all;
  }
}

// The fast reader for (k, v) with key dot `dot` (dispatch.h), or an empty one (the generic reader runs).
inline FastReader packed_reader(const Source& k, const Source& v, int64_t D, int dot) {
  FastReader fr;
  if (!packed_fast_path(k, v, D)) return fr;
  fr.D = D;
  if (k.kind == kExact) {
    fr.mode = KeyMode::kExact;
    fr.score = D == 64 ? pick_score_bits<64>(exact_bits(k), fr.mode, kFloat)
                       : pick_score_bits<128>(exact_bits(k), fr.mode, kFloat);
    fr.values = D == 64 ? pick_values<64>(exact_bits(v), false) : pick_values<128>(exact_bits(v), false);
    return fr;
  }
  const bool int8 = dot != kFloat && k.rope == nullptr && !(dot == kAvx2 && k.bits == 3);
  fr.mode = k.rope != nullptr ? KeyMode::kRope : int8 ? KeyMode::kInt8 : KeyMode::kFloat;
  fr.qmax = dot == kAvx2 && k.bits == 8 ? 63 : 127;  // AVX2 pair sums of 8-bit codes stay in int16
  fr.score = D == 64 ? pick_score_bits<64>(k.bits, fr.mode, dot) : pick_score_bits<128>(k.bits, fr.mode, dot);
  if (fr.score == nullptr) {  // this build has no such integer dot: float keys
    fr.mode = KeyMode::kFloat;
    fr.score = D == 64 ? pick_score_bits<64>(k.bits, fr.mode, kFloat) : pick_score_bits<128>(k.bits, fr.mode, kFloat);
  }
  const bool lut = v.kind == kCodebook;
  fr.values = D == 64 ? pick_values<64>(v.bits, lut) : pick_values<128>(v.bits, lut);
  return fr;
}

// `n` values (a multiple of 16) of a float32 / float16 / bfloat16 row as floats.
inline void load_floats(const char* src, at::ScalarType dtype, int64_t n, float* out) {
#if defined(__AVX512F__)
  if (dtype == at::kHalf) {
    for (int64_t i = 0; i < n; i += kLanes)
      _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src) + i / kLanes)));
    return;
  }
#endif
  if (dtype == at::kFloat) {
    std::memcpy(out, src, n * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = load_float(src, dtype, i);
}

// int8 codes q8 and scale a of one row of q (.) s: q8 = round(qs / a), a = max |qs| / qmax.
inline void quantize_row(const float* qs, int64_t D, int qmax, int8_t* q8, float* a) {
  vf mv = vf{};
  for (int64_t c = 0; c < D; c += kLanes) {
    vf x = vload(qs + c);
    x = x < 0 ? -x : x;
    mv = x > mv ? x : mv;
  }
  const float amax = hmax(mv);
  if (!(amax > 0.f) || !std::isfinite(amax)) {  // zero (or non-finite) query: score = q . o only
    std::fill(q8, q8 + D, int8_t{0});
    *a = amax > 0.f ? amax : 0.f;  // inf / nan propagate through the score like the float path
    return;
  }
  const vf inv = vsplat(static_cast<float>(qmax) / amax);
  for (int64_t c = 0; c < D; c += kLanes) {
    const vi x = __builtin_convertvector(vround(vload(qs + c) * inv), vi);
#if defined(__AVX512F__)
    __m512i xi;
    std::memcpy(&xi, &x, sizeof(xi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q8 + c), _mm512_cvtsepi32_epi8(xi));
#else
    for (int i = 0; i < kLanes; ++i) q8[c + i] = static_cast<int8_t>(x[i]);
#endif
  }
  *a = amax / static_cast<float>(qmax);
}

// Per key group: what the key mode needs from the group's scales s and offsets o (row `row` of span sp).
inline void prepare_key_group(const Source& ks, const Span& sp, int64_t row, int64_t nr, int64_t D,
                              const FastReader& fr, RowState& st) {
  float* s = st.ks.data();
  float* o = st.ko.data();
  load_floats(sp.scale + row * ks.scale.row_bytes(), ks.scale.dtype, D, s);
  if (ks.has_zero) {
    load_floats(sp.zero + row * ks.zero.row_bytes(), ks.scale.dtype, D, o);
  } else {
    const vf m = vsplat(-float(ks.mid));
    for (int64_t c = 0; c < D; c += kLanes) vstore(o + c, m * vload(s + c));
  }
  if (fr.mode == KeyMode::kRope) return;  // keys dequantized in registers
  for (int64_t r = 0; r < nr; ++r) {
    const float* q = st.q.data() + r * D;
    float* qs = st.qs.data() + r * D;
    vf qo = vf{};
    for (int64_t c = 0; c < D; c += kLanes) {
      const vf qv = vload(q + c);
      vstore(qs + c, qv * vload(s + c));
      qo += qv * vload(o + c);
    }
    st.qo[r] = hsum(qo);
    if (fr.mode == KeyMode::kInt8) quantize_row(qs, D, fr.qmax, st.q8 + r * D, &st.qa[r]);
  }
}

// Tokens [a, e) (local to the segment starting at global position seg0) of one (b, h).
inline void attend_packed(const Problem& p, const Mask& mask, int64_t b, int64_t h, int64_t r0, int64_t nr,
                          int64_t seg0, int64_t a, int64_t e, const Source& ks, const Source& vs,
                          const FastReader& fr, RowState& st) {
  const int64_t D = p.D, C = D / kLanes;
  const bool exact = fr.mode == KeyMode::kExact;  // exact rows: no scales, one "group" of D channels
  const int64_t group = exact ? D : vs.group, groups = D / group, chunks_per_group = group / kLanes;
  const int64_t kst = ks.data.row_bytes(), vst = vs.data.row_bytes();
  const int64_t vsst = vs.scale.row_bytes(), vzst = vs.zero.row_bytes();
  alignas(64) float vscale[8 * kTile], voffset[8 * kTile], wp[kRowBlockMax * 8 * kTile];
  const Levels lev(vs.kind == kCodebook ? vs.lut : nullptr);
  KeyTile kt;
  Cursor kcur(ks, b, h, e), vcur(vs, b, h, e);
  const Span &ksp = kcur.cur, &vsp = vcur.cur;  // the (b, h) row, or the current block of a paged source
  for (int64_t t0 = a; t0 < e;) {
    kcur.seek(t0);
    vcur.seek(t0);
    // A tile never crosses a key group nor a block, so the key scales are fixed within it and its
    // rows are consecutive.
    const int64_t kg = exact ? kTile : ks.group, g = t0 / kg;
    const int64_t n = std::min({kTile, (g + 1) * kg - t0, e - t0, ksp.end - t0, vsp.end - t0});
    if (!exact && (t0 == a || t0 % ks.group == 0)) prepare_key_group(ks, ksp, ks.scale_row(ksp, t0), nr, D, fr, st);
    if (fr.mode == KeyMode::kRope)
      for (int64_t t = 0; t < n; ++t) kt.cs[t] = ks.rope + ks.position(b, h, t0 + t) * D;
    kcur.prefetch(t0, n);
    vcur.prefetch(t0, n);
    const uint8_t* k0 = reinterpret_cast<const uint8_t*>(ksp.data) + (t0 - ksp.first) * kst;
    const uint8_t* v0 = reinterpret_cast<const uint8_t*>(vsp.data) + (t0 - vsp.first) * vst;
    fr.score(k0, kst, n, nr, kt, st);
    softmax_tile(p, mask, b, h, r0, nr, seg0 + t0, n, exact ? 0 : groups, st);
    if (exact) {  // the weights as they are
      for (int64_t r = 0; r < nr; ++r) std::copy_n(st.score(r), kTile, wp + r * C * kTile);
      fr.values(v0, vst, n, nr, chunks_per_group, wp, lev, st);
      t0 += n;
      continue;
    }
    // Token scales and offsets, (groups, kTile); then weights premultiplied by them.
    const char* vsr = vsp.scale + (t0 - vsp.first) * vsst;
    const char* vzr = vs.has_zero ? vsp.zero + (t0 - vsp.first) * vzst : nullptr;
    if (groups == 1 && vsst == vs.scale.es && n == kTile) {  // one scale per token, consecutive
      load_floats(vsr, vs.scale.dtype, kTile, vscale);
      if (vzr) {
        load_floats(vzr, vs.scale.dtype, kTile, voffset);
      } else {
        const vf m = vsplat(-float(vs.mid));
        for (int64_t t = 0; t < kTile; t += kLanes) vstore(voffset + t, m * vload(vscale + t));
      }
    } else {
      for (int64_t t = 0; t < kTile; ++t) {
        const int64_t i = std::min(t, n - 1);
        for (int64_t k = 0; k < groups; ++k) {
          const float s = load_float(vsr + i * vsst, vs.scale.dtype, k);
          vscale[k * kTile + t] = s;
          voffset[k * kTile + t] = vzr ? load_float(vzr + i * vzst, vs.scale.dtype, k) : -float(vs.mid) * s;
        }
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const float* w = st.score(r);  // 0 beyond n
      for (int64_t k = 0; k < groups; ++k) {
        vf z = vf{};
        for (int64_t t = 0; t < kTile; t += kLanes) {
          const vf wv = vload(w + t);
          vstore(wp + (r * C + k) * kTile + t, wv * vload(vscale + k * kTile + t));
          z += wv * vload(voffset + k * kTile + t);
        }
        st.zacc[r * D + k] += hsum(z);
      }
    }
    fr.values(v0, vst, n, nr, chunks_per_group, wp, lev, st);
    t0 += n;
  }
  if (exact) return;
  for (int64_t r = 0; r < nr; ++r) {  // fold the value offsets in, once per segment
    float* acc = st.acc.data() + r * D;
    float* zacc = st.zacc.data() + r * D;
    for (int64_t c = 0; c < D; ++c) acc[c] += zacc[c / vs.group];
    std::fill(zacc, zacc + groups, 0.f);
  }
}

}  // namespace kvsqueeze
