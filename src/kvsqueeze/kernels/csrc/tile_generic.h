// Generic tile reader: any source format (exact, integer 2/3/4/8-bit, FP8 through a table, either
// grouping axis), any head_dim. Keys and values are decoded to float rows, then scored/accumulated.
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

// Tokens [a, e) (local to the segment starting at global position seg0) of one (b, h).
inline void attend_generic(const Problem& p, const Mask& mask, int64_t b, int64_t h, int64_t r0, int64_t nr,
                           int64_t seg0, int64_t a, int64_t e, TileDecoder& kdec, TileDecoder& vdec,
                           float* kbuf, float* vbuf, RowState& st) {
  const int64_t D = p.D;
  for (int64_t t0 = a; t0 < e;) {
    const int64_t n = std::min({kTile, e - t0, kdec.run(t0), vdec.run(t0)});  // within a block when paged
    const float* K = kdec.decode(b, h, t0, n, kbuf);
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
