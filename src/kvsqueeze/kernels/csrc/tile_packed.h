// Fast tile reader for the KIVI layout: integer keys grouped per channel, integer values grouped
// per token (group a multiple of 16 channels), head_dim D in {64, 128}. Codes are never
// dequantized element by element:
//   keys    q . k_t = sum_d (q_d s_d) c_td + sum_d q_d o_d, with s, o shared by a group of tokens,
//           so q (.) s and q . o are computed once per group;
//   values  sum_t p_t (c_td s_tg + o_tg) = sum_t (p_t s_tg) c_td + sum_t p_t o_tg, the second term
//           accumulated per channel group (zacc) and added once per segment.
// (o is the zero point, or -mid * s for symmetric codes.) Up to 4 query rows are processed per
// pass with their accumulators in registers, so each token's codes are unpacked once per pass.
// Paged sources are read block by block (`Cursor`); the non-paged ones as one span per (b, h).
#pragma once

#include <algorithm>

#include "decode.h"
#include "online_softmax.h"
#include "simd.h"

namespace kvsqueeze {

constexpr int kRowsPerPass = 4;

inline bool packed_fast_path(const Source& k, const Source& v, int64_t D) {
  auto bits_ok = [&](int64_t bits) {
    return (bits == 4 && D % 32 == 0) || (bits == 8 && D % 16 == 0) || (bits == 2 && D % 64 == 0);
  };
  return (D == 64 || D == 128) && k.kind == kInt && v.kind == kInt && k.axis == 1 && v.axis == 0 &&
         bits_ok(k.bits) && bits_ok(v.bits) && v.group % kLanes == 0 && D % v.group == 0;
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

// Scores of NR rows (from row r) for n tokens of codes kc (row stride kst bytes), into st.sc.
template <int D, int KB, int NR>
void score_keys(const uint8_t* kc, int64_t kst, int64_t n, int64_t r, RowState& st) {
  constexpr int C = D / kLanes;
  vf qs[NR][C];
  for (int i = 0; i < NR; ++i)
    for (int c = 0; c < C; ++c) qs[i][c] = vload(st.qs.data() + (r + i) * D + c * kLanes);
  vf kv[C], part[NR][kLanes];
  for (int64_t t0 = 0; t0 < n; t0 += kLanes) {  // 16 tokens, then one transposed horizontal sum
    const int64_t m = std::min<int64_t>(kLanes, n - t0);
    for (int64_t j = 0; j < kLanes; ++j) {
      if (j >= m) {
        for (int i = 0; i < NR; ++i) part[i][j] = vf{};
        continue;
      }
      unpack_codes<D, KB>(kc + (t0 + j) * kst, kv);
      for (int i = 0; i < NR; ++i) {
        vf acc = qs[i][0] * kv[0];
        for (int c = 1; c < C; ++c) acc += qs[i][c] * kv[c];
        part[i][j] = acc;
      }
    }
    for (int i = 0; i < NR; ++i) vstore(st.score(r + i) + t0, hsum16(part[i]) + st.qo[r + i]);
  }
}

// acc[r] += sum_t wp[r][g(c)][t] * codes_t, wp = weights premultiplied by the token's scales.
template <int D, int VB, int NR>
void accumulate_values(const uint8_t* vc, int64_t vst, int64_t n, int64_t r, int64_t chunks_per_group,
                       const float* wp, RowState& st) {
  constexpr int C = D / kLanes;
  vf acc[NR][C];
  for (int i = 0; i < NR; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = vload(st.acc.data() + (r + i) * D + c * kLanes);
  vf cv[C];
  for (int64_t t = 0; t < n; ++t) {
    unpack_codes<D, VB>(vc + t * vst, cv);
    for (int i = 0; i < NR; ++i) {
      const float* w = wp + (r + i) * C * kTile;  // (rows, groups, kTile)
      for (int c = 0; c < C; ++c) acc[i][c] += vsplat(w[(c / chunks_per_group) * kTile + t]) * cv[c];
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int c = 0; c < C; ++c) vstore(st.acc.data() + (r + i) * D + c * kLanes, acc[i][c]);
}

template <int D, int KB, int VB>
void attend_packed(const Problem& p, const Mask& mask, int64_t b, int64_t h, int64_t r0, int64_t nr,
                   int64_t seg0, int64_t a, int64_t e, const Source& ks, const Source& vs, RowState& st) {
  constexpr int C = D / kLanes;
  const int64_t groups = D / vs.group, chunks_per_group = vs.group / kLanes;
  const int64_t vsst = vs.scale.row_bytes(), vzst = vs.zero.row_bytes();
  alignas(64) float vscale[C * kTile], voffset[C * kTile], wp[kRowBlockMax * C * kTile];
  Cursor kcur(ks, b, h, e), vcur(vs, b, h, e);
  const Span &ksp = kcur.cur, &vsp = vcur.cur;  // the (b, h) row, or the current block of a paged source
  for (int64_t t0 = a; t0 < e;) {
    kcur.seek(t0);
    vcur.seek(t0);
    // A tile never crosses a key group nor a block, so the key scales are fixed within it and its
    // rows are consecutive.
    const int64_t g = t0 / ks.group;
    const int64_t n = std::min({kTile, (g + 1) * ks.group - t0, e - t0, ksp.end - t0, vsp.end - t0});
    if (t0 == a || t0 % ks.group == 0) {
      const int64_t row = ks.scale_row(ksp, t0);
      const char* sp = ksp.scale + row * ks.scale.row_bytes();
      const char* zp = ks.has_zero ? ksp.zero + row * ks.zero.row_bytes() : nullptr;
      for (int64_t r = 0; r < nr; ++r) {
        const float* q = st.q.data() + r * D;
        float* qs = st.qs.data() + r * D;
        float qo = 0.f;
        for (int c = 0; c < D; ++c) {
          const float s = load_float(sp, ks.scale.dtype, c);
          const float o = zp ? load_float(zp, ks.scale.dtype, c) : -float(ks.mid) * s;
          qs[c] = q[c] * s, qo += q[c] * o;
        }
        st.qo[r] = qo;
      }
    }
    kcur.prefetch(t0, n);
    vcur.prefetch(t0, n);
    const uint8_t* k0 = reinterpret_cast<const uint8_t*>(ksp.data) + (t0 - ksp.first) * ks.data.st;
    const uint8_t* v0 = reinterpret_cast<const uint8_t*>(vsp.data) + (t0 - vsp.first) * vs.data.st;
    for (int64_t r = 0; r < nr; r += kRowsPerPass) {
      switch (std::min<int64_t>(kRowsPerPass, nr - r)) {
        case 1: score_keys<D, KB, 1>(k0, ks.data.st, n, r, st); break;
        case 2: score_keys<D, KB, 2>(k0, ks.data.st, n, r, st); break;
        case 3: score_keys<D, KB, 3>(k0, ks.data.st, n, r, st); break;
        default: score_keys<D, KB, 4>(k0, ks.data.st, n, r, st); break;
      }
    }
    softmax_tile(p, mask, b, h, r0, nr, seg0 + t0, n, groups, st);
    // Token scales and offsets, (groups, kTile); then weights premultiplied by them.
    const char* vsr = vsp.scale + (t0 - vsp.first) * vsst;
    const char* vzr = vs.has_zero ? vsp.zero + (t0 - vsp.first) * vzst : nullptr;
    for (int64_t t = 0; t < kTile; ++t) {
      const int64_t i = std::min(t, n - 1);
      for (int64_t k = 0; k < groups; ++k) {
        const float s = load_float(vsr + i * vsst, vs.scale.dtype, k);
        vscale[k * kTile + t] = s;
        voffset[k * kTile + t] = vzr ? load_float(vzr + i * vzst, vs.scale.dtype, k) : -float(vs.mid) * s;
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
    for (int64_t r = 0; r < nr; r += kRowsPerPass) {
      switch (std::min<int64_t>(kRowsPerPass, nr - r)) {
        case 1: accumulate_values<D, VB, 1>(v0, vs.data.st, n, r, chunks_per_group, wp, st); break;
        case 2: accumulate_values<D, VB, 2>(v0, vs.data.st, n, r, chunks_per_group, wp, st); break;
        case 3: accumulate_values<D, VB, 3>(v0, vs.data.st, n, r, chunks_per_group, wp, st); break;
        default: accumulate_values<D, VB, 4>(v0, vs.data.st, n, r, chunks_per_group, wp, st); break;
      }
    }
    t0 += n;
  }
  for (int64_t r = 0; r < nr; ++r) {  // fold the value offsets in, once per segment
    float* acc = st.acc.data() + r * D;
    float* zacc = st.zacc.data() + r * D;
    for (int c = 0; c < D; ++c) acc[c] += zacc[c / vs.group];
    std::fill(zacc, zacc + groups, 0.f);
  }
}

using PackedFn = void (*)(const Problem&, const Mask&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                          int64_t, const Source&, const Source&, RowState&);

template <int D, int KB>
PackedFn pick_value_bits(int64_t vb) {
  switch (vb) {
    case 2: return &attend_packed<D, KB, 2>;
    case 4: return &attend_packed<D, KB, 4>;
    default: return &attend_packed<D, KB, 8>;
  }
}

template <int D>
PackedFn pick_key_bits(int64_t kb, int64_t vb) {
  switch (kb) {
    case 2: return pick_value_bits<D, 2>(vb);
    case 4: return pick_value_bits<D, 4>(vb);
    default: return pick_value_bits<D, 8>(vb);
  }
}

// The specialised reader for (k, v), or nullptr (then the generic reader runs).
inline PackedFn packed_reader(const Source& k, const Source& v, int64_t D) {
  if (!packed_fast_path(k, v, D)) return nullptr;
  return D == 64 ? pick_key_bits<64>(k.bits, v.bits) : pick_key_bits<128>(k.bits, v.bits);
}

}  // namespace kvsqueeze
