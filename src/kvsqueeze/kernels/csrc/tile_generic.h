// Generic tile reader: any source format (exact, integer 2/3/4/8-bit, FP8 through a table, codebook
// levels, outliers, either grouping axis), any head_dim, pre-RoPE and rotated keys. Keys and values
// are decoded to float rows, keys brought back to post-RoPE space, then scored/accumulated.
#pragma once

#include <algorithm>

#include "decode.h"
#include "online_softmax.h"

namespace kvsqueeze {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// RoPE of one key row x (D floats) at the table row `cs` = [cos (D/2) | sin (D/2)], in place:
// y[d] = x[d] cos[d] - x[d + D/2] sin[d], y[d + D/2] = x[d + D/2] cos[d] + x[d] sin[d] (rotate_half).
inline void rope_row(float* x, const float* cs, int64_t D) {
  const int64_t half = D / 2;
  const float* sn = cs + half;
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) {
    const float lo = x[d], hi = x[d + half];
    x[d] = lo * cs[d] - hi * sn[d];
    x[d + half] = hi * cs[d] + lo * sn[d];
  }
}

// Whether the reader must transform decoded keys itself: pre-RoPE keys (RoPE per token). Rotated
// keys without RoPE are read with a rotated query instead (attention.cpp).
inline bool keys_need_transform(const Source& ks) { return ks.rope != nullptr; }

// Decoded keys K (n rows of D, pre-RoPE, maybe rotated) of tokens [t0, t0 + n) of (b, h) -> post-RoPE
// keys in `buf`: x @ Q^T when they were also rotated, then RoPE at each token's cache position.
inline const float* transform_keys(const Source& ks, int64_t b, int64_t h, int64_t t0, int64_t n, int64_t D,
                                   const float* K, float* buf) {
  std::vector<float> tmp(ks.rot != nullptr ? D : 0);  // K may alias buf
  for (int64_t t = 0; t < n; ++t) {
    float* y = buf + t * D;
    const float* x = K + t * D;
    if (ks.rot != nullptr) {  // y = x @ Q^T: y[j] = sum_i x[i] Q[j][i] (slow; no preset rotates keys)
      std::copy_n(x, D, tmp.data());
      for (int64_t j = 0; j < D; ++j) y[j] = dot(tmp.data(), ks.rot + j * D, D);
    } else if (y != x) {
      std::copy_n(x, D, y);
    }
    rope_row(y, ks.rope + ks.position(b, h, t0 + t) * D, D);
  }
  return buf;
}

// Tokens [a, e) (local to the segment starting at global position seg0) of one (b, h).
inline void attend_generic(const Problem& p, const Mask& mask, int64_t b, int64_t h, int64_t r0, int64_t nr,
                           int64_t seg0, int64_t a, int64_t e, TileDecoder& kdec, TileDecoder& vdec,
                           const Source& ks, float* kbuf, float* vbuf, RowState& st) {
  const int64_t D = p.D;
  const bool rope = keys_need_transform(ks);
  for (int64_t t0 = a; t0 < e;) {
    const int64_t n = std::min({kTile, e - t0, kdec.run(t0), vdec.run(t0)});  // within a block when paged
    const float* K = kdec.decode(b, h, t0, n, kbuf);
    if (rope) K = transform_keys(ks, b, h, t0, n, D, K, kbuf);
    for (int64_t r = 0; r < nr; ++r) {
      float* sc = st.score(r);
      const float* q = st.q.data() + r * D;
      for (int64_t t = 0; t < n; ++t) sc[t] = dot(q, K + t * D, D);
    }
    softmax_tile(p, mask, b, h, r0, nr, seg0 + t0, n, 0, st);
    const float* V = vdec.decode(b, h, t0, n, vbuf);
    for (int64_t t = 0; t < n; ++t) {
      const float* v = V + t * D;
      for (int64_t r = 0; r < nr; ++r) {
        const float w = st.score(r)[t];
        if (w == 0.f) continue;
        float* acc = st.acc.data() + r * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) acc[c] += w * v[c];
      }
    }
    t0 += n;
  }
}

}  // namespace kvsqueeze
