// Online-softmax state of the query rows of one work item, the attention mask, and the
// per-tile softmax update shared by every tile reader.
//
// Rows: for kv head h, row r = g * Lq + i is query token i of query head h * G + g.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace kvsqueeze {

constexpr int64_t kTile = 32;         // tokens scored together (a multiple of the vector width)
constexpr int64_t kRowBlockMax = 64;  // query rows per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  int64_t B, Hq, Hkv, G, Lq, D, R, T;
  std::vector<int64_t> seg_start;  // first token of each segment, then T
  float scaling;
  bool causal;
  const float* sinks = nullptr;  // (B, Hq, Lq) sink logits or null (see attention.cpp, write_rows)
};

struct Mask {
  const char* ptr = nullptr;
  bool is_bool = false;
  int64_t sb = 0, sh = 0, sq = 0, st = 0, batches = 1, heads = 1;

  explicit Mask(const c10::optional<at::Tensor>& m) {
    if (!m.has_value()) return;
    const at::Tensor& t = *m;
    ptr = static_cast<const char*>(t.data_ptr());
    is_bool = t.scalar_type() == at::kBool;
    sb = t.stride(0), sh = t.stride(1), sq = t.stride(2), st = t.stride(3);
    batches = t.size(0), heads = t.size(1);
  }
  // Additive bias for (b, hq, i, t): 0 / -inf for bool masks.
  float bias(int64_t b, int64_t hq, int64_t i, int64_t t) const {
    const int64_t off = (batches == 1 ? 0 : b) * sb + (heads == 1 ? 0 : hq) * sh + i * sq + t * st;
    if (is_bool) return reinterpret_cast<const bool*>(ptr)[off] ? 0.f : kNegInf;
    return reinterpret_cast<const float*>(ptr)[off];
  }
};

// Per work item: the scaled queries (q; q_plain keeps them while q holds the rotated ones of a
// segment with rotated keys), per key group the queries times the key scales (qs), their int8 codes
// (q8) and scales (qa) for integer dot products, and q . offset (qo); the key scales and offsets
// themselves (ks, ko: pre-RoPE keys are dequantized); the output accumulators (acc, and zacc for
// value offsets per channel group), running max m and sum l, and a tile of scores / weights (sc).
struct RowState {
  int64_t rows, D;
  std::vector<float> q, q_plain, qs, acc, zacc, m, l, sc, qo, qa, ks, ko;
  std::vector<int8_t> q8_store;
  int8_t* q8;  // rows x D, 64-byte aligned
  RowState(int64_t rows_, int64_t D_)
      : rows(rows_), D(D_), q(rows_ * D_), q_plain(rows_ * D_), qs(rows_ * D_), acc(rows_ * D_), zacc(rows_ * D_),
        m(rows_), l(rows_), sc(rows_ * kTile), qo(rows_), qa(rows_), ks(D_), ko(D_), q8_store(rows_ * D_ + 64) {
    const auto addr = reinterpret_cast<uintptr_t>(q8_store.data());
    q8 = q8_store.data() + ((64 - addr % 64) % 64);
  }
  float* score(int64_t r) { return sc.data() + r * kTile; }
};

// Scores of a tile of n tokens (global positions t0 ..) in st.sc -> softmax weights, updating the
// running max m and sum l of each row and rescaling its accumulators (acc, and zacc up to zcols).
inline void softmax_tile(const Problem& p, const Mask& mask, int64_t b, int64_t h, int64_t r0, int64_t nr,
                         int64_t t0, int64_t n, int64_t zcols, RowState& st) {
  for (int64_t r = 0; r < nr; ++r) {
    float* sc = st.score(r);
    const int64_t row = r0 + r, i = row % p.Lq;
    if (mask.ptr) {
      const int64_t hq = h * p.G + row / p.Lq;
      for (int64_t t = 0; t < n; ++t) sc[t] += mask.bias(b, hq, i, t0 + t);
    } else if (p.causal) {
      const int64_t limit = p.T - p.Lq + i;  // last visible position
      for (int64_t t = std::max<int64_t>(0, limit + 1 - t0); t < n; ++t) sc[t] = kNegInf;
    }
    for (int64_t t = n; t < kTile; ++t) sc[t] = kNegInf;
    vf mv = vload(sc);
    for (int64_t t = kLanes; t < kTile; t += kLanes) {
      const vf x = vload(sc + t);
      mv = x > mv ? x : mv;
    }
    const float mt = hmax(mv);
    const float m_new = std::max(st.m[r], mt);
    if (m_new == kNegInf) {  // nothing visible yet: no weight
      std::fill(sc, sc + kTile, 0.f);
      continue;
    }
    const vf mnew = vsplat(m_new);
    vf sum = vf{};
    for (int64_t t = 0; t < kTile; t += kLanes) {
      const vf w = vexp(vload(sc + t) - mnew);
      vstore(sc + t, w);
      sum += w;
    }
    const float alpha = st.m[r] == kNegInf ? 0.f : std::exp(st.m[r] - m_new);
    st.l[r] = st.l[r] * alpha + hsum(sum);
    st.m[r] = m_new;
    if (alpha != 1.f) {
      float* acc = st.acc.data() + r * p.D;
      float* zacc = st.zacc.data() + r * p.D;
#pragma omp simd
      for (int64_t c = 0; c < p.D; ++c) acc[c] *= alpha;
      for (int64_t c = 0; c < zcols; ++c) zacc[c] *= alpha;
    }
  }
}

}  // namespace kvsqueeze
