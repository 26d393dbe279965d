// Fused attention over a sequence of segments (exact sinks, packed pages, exact tail), read in
// place: online softmax per work item (batch, kv head, block of query rows, split of the tokens),
// then a log-sum-exp merge of the splits (flash-decoding).
//
// query (B, Hq, Lq, D); every source (B, Hkv, >= T_seg, D) or paged (blocks of it, see decode.h);
// mask None or (B|1, Hq|1, Lq, T), bool or float32 (additive); causal (used without a mask): query
// i sees t <= T - Lq + i;
// sinks None or (B, Hq, Lq) float32: one extra logit per query row in the softmax denominator whose
// value is zero (GPT-OSS attention sinks), applied when the rows are written.
// Returns (B, Lq, Hq, D) in the query's dtype, the layout transformers' attention functions return.
//
// Transforms of a segment's stored tokens (decode.h): keys rotated by Q (k' = k Q) are read with the
// rotated query q Q, since q . k = (q Q) . (k Q); values rotated by Q are accumulated as stored and the
// accumulator is rotated back once per segment and row: acc Q before the segment, then (acc + sum p v')
// Q^T after it (exact, Q orthogonal; the softmax rescaling commutes). Pre-RoPE keys get RoPE in the
// tile readers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <exception>
#include <vector>

#include "decode.h"
#include "dispatch.h"
#include "online_softmax.h"
#include "tile_generic.h"
#include "tile_packed.h"

namespace kvsqueeze {

namespace {

constexpr int64_t kRowBlock = kRowBlockMax;
constexpr int64_t kMinSplit = 512;            // fewest tokens worth a split of their own
constexpr int64_t kMinParallelWork = 1 << 14;  // (token, row) pairs below which one thread is faster

template <typename scalar_t>
void load_queries(const at::Tensor& query, const Problem& p, int64_t b, int64_t h, int64_t r0, int64_t nr,
                  RowState& st) {
  const scalar_t* q = query.data_ptr<scalar_t>();
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = r0 + r, hq = h * p.G + row / p.Lq, i = row % p.Lq;
    const scalar_t* src = q + b * query.stride(0) + hq * query.stride(1) + i * query.stride(2);
    for (int64_t c = 0; c < p.D; ++c) st.q[r * p.D + c] = static_cast<float>(src[c]) * p.scaling;
  }
  std::copy_n(st.q.data(), nr * p.D, st.q_plain.data());
  std::fill(st.acc.begin(), st.acc.begin() + nr * p.D, 0.f);
  std::fill(st.zacc.begin(), st.zacc.begin() + nr * p.D, 0.f);
  std::fill(st.m.begin(), st.m.begin() + nr, kNegInf);
  std::fill(st.l.begin(), st.l.begin() + nr, 0.f);
}

// Rows x (nr x D) times Q (D x D), or Q^T, in place.
void rotate_rows(float* x, int64_t nr, int64_t D, const float* Q, bool transpose, std::vector<float>& tmp) {
  tmp.resize(D);
  for (int64_t r = 0; r < nr; ++r) {
    float* row = x + r * D;
    std::fill(tmp.begin(), tmp.end(), 0.f);
    if (transpose) {  // y[j] = sum_i x[i] Q[j][i]
      for (int64_t j = 0; j < D; ++j) {
        float s = 0.f;
        const float* q = Q + j * D;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < D; ++i) s += row[i] * q[i];
        tmp[j] = s;
      }
    } else {  // y[j] = sum_i x[i] Q[i][j]
      for (int64_t i = 0; i < D; ++i) {
        const float xi = row[i];
        const float* q = Q + i * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) tmp[j] += xi * q[j];
      }
    }
    std::copy(tmp.begin(), tmp.end(), row);
  }
}

// 1 / softmax denominator of a row with running max m and sum l (relative to m), the sink logit s
// joining it: 1 / (l + exp(s - m)), computed relative to max(m, s) so a large sink cannot overflow.
inline float inverse_denominator(float m, float l, const float* sink) {
  if (sink == nullptr) return l > 0.f ? 1.f / l : 0.f;  // rows that see no token give 0
  const float top = std::max(m, *sink);
  if (m == kNegInf || top == kNegInf) return 0.f;
  const float own = std::exp(m - top), denom = l * own + std::exp(*sink - top);
  return denom > 0.f ? own / denom : 0.f;  // NaN (a +inf sink) also gives 0
}

template <typename scalar_t>
void write_rows(at::Tensor& out, const Problem& p, int64_t b, int64_t h, int64_t r0, int64_t nr,
                const float* acc, const float* m, const float* l) {
  scalar_t* o = out.data_ptr<scalar_t>();
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = r0 + r, hq = h * p.G + row / p.Lq, i = row % p.Lq;
    scalar_t* dst = o + ((b * p.Lq + i) * p.Hq + hq) * p.D;
    const float* sink = p.sinks ? p.sinks + (b * p.Hq + hq) * p.Lq + i : nullptr;
    const float inv = inverse_denominator(m[r], l[r], sink);
    for (int64_t c = 0; c < p.D; ++c) dst[c] = static_cast<scalar_t>(acc[r * p.D + c] * inv);
  }
}

// Serial on purpose: splits exist only when (batch x kv heads x row blocks) is small, so this is
// a few thousand floats, cheaper than another fork/join (which costs a scheduler slice when the
// machine is oversubscribed).
void merge_splits(at::Tensor& out, const Problem& p, int64_t splits, const at::Tensor& part_m,
                  const at::Tensor& part_l, const at::Tensor& part_acc) {
  const float* pm = part_m.data_ptr<float>();
  const float* pl = part_l.data_ptr<float>();
  const float* pa = part_acc.data_ptr<float>();
  {
    std::vector<float> acc(p.D);
    for (int64_t bhr = 0; bhr < p.B * p.Hkv * p.R; ++bhr) {
      const int64_t r = bhr % p.R, bh = bhr / p.R;
      float M = kNegInf, l = 0.f;
      for (int64_t s = 0; s < splits; ++s) M = std::max(M, pm[(bh * splits + s) * p.R + r]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; M != kNegInf && s < splits; ++s) {
        const int64_t idx = (bh * splits + s) * p.R + r;
        if (pm[idx] == kNegInf) continue;
        const float w = std::exp(pm[idx] - M);
        l += w * pl[idx];
        for (int64_t c = 0; c < p.D; ++c) acc[c] += w * pa[idx * p.D + c];
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "kvsqueeze_merge", [&] {
        write_rows<scalar_t>(out, p, bh / p.Hkv, bh % p.Hkv, r, 1, acc.data(), &M, &l);
      });
    }
  }
}

}  // namespace

// max_threads: the threads the work is planned for (how many splits of the tokens); serial: run the
// planned items on the calling thread (fused_attention_many runs several problems side by side, each
// planned as if alone so that its sums, hence its result, are the same as in a call of its own).
at::Tensor fused_attention_impl(const at::Tensor& query, const std::vector<at::Tensor>& tensors,
                                const std::vector<int64_t>& meta, const std::vector<int64_t>& seg_tokens,
                                const c10::optional<at::Tensor>& mask_t, double scaling, bool causal,
                                const at::Tensor& luts, const c10::optional<at::Tensor>& sinks,
                                int64_t max_threads, bool serial) {
  const int64_t nseg = static_cast<int64_t>(seg_tokens.size());
  TORCH_CHECK(nseg > 0 && static_cast<int64_t>(meta.size()) == nseg * 2 * kMetaFields, "kvsqueeze: bad meta");
  TORCH_CHECK(query.dim() == 4 && query.stride(3) == 1, "kvsqueeze: query must be (B, Hq, Lq, D)");
  std::vector<Source> sources;
  sources.reserve(2 * nseg);
  for (int64_t s = 0; s < 2 * nseg; ++s) sources.emplace_back(tensors, meta.data() + s * kMetaFields, luts);

  Problem p;
  p.B = query.size(0), p.Hq = query.size(1), p.Lq = query.size(2), p.D = query.size(3);
  p.Hkv = tensors.at(meta[kData]).size(1);  // slab 0's tensor when paged: (blocks, Hkv, ...)
  TORCH_CHECK(p.Hq % p.Hkv == 0, "kvsqueeze: query heads must be a multiple of kv heads");
  p.G = p.Hq / p.Hkv, p.R = p.G * p.Lq;
  p.seg_start.assign(1, 0);
  for (int64_t n : seg_tokens) p.seg_start.push_back(p.seg_start.back() + n);
  p.T = p.seg_start.back();
  p.scaling = static_cast<float>(scaling);
  p.causal = causal;
  for (int64_t s = 0; s < 2 * nseg; ++s)
    sources[s].check(tensors, meta.data() + s * kMetaFields, p.B, p.Hkv, seg_tokens[s / 2], p.D);
  if (mask_t.has_value()) {
    const at::Tensor& m = *mask_t;
    TORCH_CHECK(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == p.B) && (m.size(1) == 1 || m.size(1) == p.Hq) &&
                    m.size(2) == p.Lq && m.size(3) == p.T && (m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat),
                "kvsqueeze: mask must be (B|1, Hq|1, Lq, T), bool or float32");
  }
  if (sinks.has_value()) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK(s.dim() == 3 && s.size(0) == p.B && s.size(1) == p.Hq && s.size(2) == p.Lq &&
                    s.scalar_type() == at::kFloat && s.is_contiguous(),
                "kvsqueeze: sinks must be (B, Hq, Lq) contiguous float32");
    p.sinks = s.data_ptr<float>();
  }
  const Mask mask(mask_t);
  const int dot = key_dot_setting().load();
  std::vector<FastReader> fast(nseg);
  for (int64_t s = 0; s < nseg; ++s) fast[s] = packed_reader(sources[2 * s], sources[2 * s + 1], p.D, dot);

  // Work items: (b, h, row block, split); split the tokens only when (b, h, row block) are too few.
  const int64_t row_blocks = (p.R + kRowBlock - 1) / kRowBlock;
  const int64_t threads = p.B * p.Hkv * p.R * p.T < kMinParallelWork ? 1 : max_threads;
  const int64_t base_items = p.B * p.Hkv * row_blocks;
  int64_t splits = std::max<int64_t>(1, (8 * threads + base_items - 1) / base_items);
  splits = std::min(splits, std::max<int64_t>(1, p.T / kMinSplit));
  const int64_t split_tokens = ((p.T + splits - 1) / splits + kTile - 1) / kTile * kTile;
  splits = std::max<int64_t>(1, (p.T + split_tokens - 1) / split_tokens);
  const int64_t items = base_items * splits;

  at::Tensor out = at::empty({p.B, p.Lq, p.Hq, p.D}, query.options());
  at::Tensor part_m, part_l, part_acc;  // per split: (B, Hkv, splits, R) max and sum, (..., D) output
  if (splits > 1) {
    part_m = at::empty({p.B, p.Hkv, splits, p.R}, at::kFloat);
    part_l = at::empty_like(part_m);
    part_acc = at::empty({p.B, p.Hkv, splits, p.R, p.D}, at::kFloat);
  }

#pragma omp parallel num_threads(serial ? 1 : threads)
  {
    std::vector<TileDecoder> dec;
    dec.reserve(sources.size());
    for (const Source& s : sources) dec.emplace_back(s, p.D);
    RowState st(std::min(p.R, kRowBlock), p.D);
    std::vector<float> kbuf(kTile * p.D), vbuf(kTile * p.D), tmp;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t split = item % splits, rb = (item / splits) % row_blocks;
      const int64_t h = (item / splits / row_blocks) % p.Hkv, b = item / splits / row_blocks / p.Hkv;
      const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, p.R - r0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "kvsqueeze_q",
                                      [&] { load_queries<scalar_t>(query, p, b, h, r0, nr, st); });
      const int64_t lo = split * split_tokens, hi = std::min(p.T, lo + split_tokens);
      const float* q_rot = nullptr;  // the rotation st.q holds (null: the plain query)
      for (int64_t s = 0; s < nseg; ++s) {
        const int64_t seg0 = p.seg_start[s];
        const int64_t a = std::max(lo, seg0) - seg0, e = std::min(hi, p.seg_start[s + 1]) - seg0;
        if (a >= e) continue;
        const Source &ks = sources[2 * s], &vs = sources[2 * s + 1];
        const float* want = ks.rope == nullptr ? ks.rot : nullptr;  // rotated, post-RoPE keys: rotate q
        if (want != q_rot) {
          std::copy_n(st.q_plain.data(), nr * p.D, st.q.data());
          if (want != nullptr) rotate_rows(st.q.data(), nr, p.D, want, false, tmp);
          q_rot = want;
        }
        if (vs.rot != nullptr) rotate_rows(st.acc.data(), nr, p.D, vs.rot, false, tmp);
        if (fast[s]) {
          attend_packed(p, mask, b, h, r0, nr, seg0, a, e, ks, vs, fast[s], st);
        } else {
          attend_generic(p, mask, b, h, r0, nr, seg0, a, e, dec[2 * s], dec[2 * s + 1], ks, kbuf.data(), vbuf.data(),
                         st);
        }
        if (vs.rot != nullptr) rotate_rows(st.acc.data(), nr, p.D, vs.rot, true, tmp);
      }
      if (splits == 1) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "kvsqueeze_out", [&] {
          write_rows<scalar_t>(out, p, b, h, r0, nr, st.acc.data(), st.m.data(), st.l.data());
        });
      } else {
        const int64_t base = ((b * p.Hkv + h) * splits + split) * p.R + r0;
        std::copy_n(st.m.data(), nr, part_m.data_ptr<float>() + base);
        std::copy_n(st.l.data(), nr, part_l.data_ptr<float>() + base);
        std::copy_n(st.acc.data(), nr * p.D, part_acc.data_ptr<float>() + base * p.D);
      }
    }
  }
  if (splits > 1) merge_splits(out, p, splits, part_m, part_l, part_acc);
  return out;
}

at::Tensor fused_attention(const at::Tensor& query, const std::vector<at::Tensor>& tensors,
                           const std::vector<int64_t>& meta, const std::vector<int64_t>& seg_tokens,
                           const c10::optional<at::Tensor>& mask_t, double scaling, bool causal,
                           const at::Tensor& luts, const c10::optional<at::Tensor>& sinks) {
  return fused_attention_impl(query, tensors, meta, seg_tokens, mask_t, scaling, causal, luts, sinks,
                              at::get_num_threads(), false);
}

// Several independent problems (e.g. the decode token of every sequence of a serving step, each over
// its own segments), without masks or sinks, causal: one call instead of one per problem, the
// problems spread over the threads (dynamic: sequences differ in length). Each is planned as a call
// of its own would plan it, so each result equals fused_attention's to the bit.
std::vector<at::Tensor> fused_attention_many(const std::vector<at::Tensor>& queries,
                                             const std::vector<std::vector<at::Tensor>>& tensors,
                                             const std::vector<std::vector<int64_t>>& metas,
                                             const std::vector<std::vector<int64_t>>& seg_tokens, double scaling,
                                             const at::Tensor& luts) {
  const int64_t n = static_cast<int64_t>(queries.size());
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == n && static_cast<int64_t>(metas.size()) == n &&
                  static_cast<int64_t>(seg_tokens.size()) == n,
              "kvsqueeze: one tensor list, meta and token list per query");
  std::vector<at::Tensor> out(n);
  const int64_t threads = at::get_num_threads();
  if (n == 1 || threads == 1) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = fused_attention_impl(queries[i], tensors[i], metas[i], seg_tokens[i], c10::nullopt, scaling, true,
                                    luts, c10::nullopt, threads, false);
    return out;
  }
  std::vector<std::exception_ptr> errors(n);
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::min(threads, n))
  for (int64_t i = 0; i < n; ++i) {
    try {
      out[i] = fused_attention_impl(queries[i], tensors[i], metas[i], seg_tokens[i], c10::nullopt, scaling, true,
                                    luts, c10::nullopt, threads, true);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  }
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

}  // namespace kvsqueeze
