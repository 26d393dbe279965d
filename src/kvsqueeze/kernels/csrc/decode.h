// Tile decoding: one K or V source of one segment (exact or packed), a few tokens at a time.
//
// A source is described by a row of `kMetaFields` int64 values built in Python
// (kvsqueeze/kernels/sources.py) plus the tensors it names by index:
//   kind   0 exact values (float32 / float16 / bfloat16), 1 integer codes, 2 codes through a 256-entry
//          table (fp8), 3 codebook codes (a non-uniform level per code, "nf")
//   bits   2, 3, 4 or 8 (packed "planar" layout, see kvsqueeze/quant/packing.py)
//   axis   0 per-token groups (scale (B, H, T, D/g)), 1 per-channel groups (scale (B, H, T/g, D))
//   group  group size
//   mid    code offset of symmetric integer codes: x = (code - mid) * scale; 0 otherwise
//   data, scale, zero   indices into the tensor list (-1: absent)
//   lut    kind 2: row of the LUT tensor (256 floats per row); kind 3: index of the float32 levels
//          tensor (2**bits,) in the list
//   table  index of the int32 block table (B, >= T / block) of a paged source (-1: not paged)
//   block, per_slab, slabs, slab_stride   paged sources: tokens per block, blocks per slab, slab
//          count, tensors per slab in the list (data/scale/zero/outliers name slab 0's; slab j's
//          are at index + j * slab_stride)
//   oidx, oval, otokens   dense-and-sparse outliers: int16 flat positions (token in block * D +
//          channel) and exact values (float16/float32), (B | blocks, H, rows / otokens, count) each,
//          per block of `otokens` rows (-1: none); they replace the dequantized entries
//   rot    index of an orthogonal float32 (D, D) rotation Q the stored tokens were multiplied by
//          (x @ Q) before quantization (-1: none); attention rotates the query (keys) or the output
//          (values) instead of every token, see attention.cpp
//   rope   index of a float32 (P, D) table, row p = [cos(p w_0 .. p w_{D/2-1}) | sin(...)], for keys
//          stored before the rotary embedding (pre-RoPE): RoPE is applied to the decoded key at its
//          cache position (-1: post-RoPE keys)
//   pos, pos_offset   cache position of token t: int32 positions (B, H, >= T, 1) at index `pos`, or
//          pos_offset + t when pos is -1
// Dequantized value: x = value(code) * scale + offset, offset = zero if present else -mid * scale,
// value(code) the code, its FP8 value or its codebook level; then the outliers are written over it.
//
// Paged sources (kvsqueeze/quant/paged.py) hold every tensor as (blocks, H, rows per block, ...):
// token t of batch row b lives in block id = table[b][t / block], i.e. slab id / per_slab at index
// id % per_slab, row t % block (scale rows: (t % block) / group per-channel, t % block per-token).
// Readers look the table up once per block (`Span`) and never let a tile cross a block.
#pragma once

#include <ATen/ATen.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace kvsqueeze {

constexpr int kMetaFields = 21;
enum Kind : int64_t { kExact = 0, kInt = 1, kLut = 2, kCodebook = 3 };
enum Field : int { kKind, kBits, kAxis, kGroup, kMid, kData, kScale, kZero, kLutRow, kTable, kBlock, kPerSlab,
                   kSlabs, kSlabStride, kOutIdx, kOutVal, kOutTokens, kRot, kRope, kPos, kPosOffset };

struct Strided {
  const char* ptr = nullptr;
  int64_t sb = 0, sh = 0, st = 0;  // strides of dims 0, 1, 2, in elements
  at::ScalarType dtype = at::kFloat;
  int64_t es = 4;  // element bytes
  struct Slab {
    const char* ptr;
    int64_t sb;
  };
  std::vector<Slab> slabs;  // paged: every slab's pointer and dim-0 stride (dims 1, 2 share sh, st)

  // Row 0 of (i0, h): i0 a batch row, or block i0 of the slab at `base`.
  const char* addr(const char* base, int64_t sb_, int64_t i0, int64_t h) const {
    return base ? base + (i0 * sb_ + h * sh) * es : nullptr;
  }
  int64_t row_bytes() const { return st * es; }
};

// Base pointers (row 0) of the codes (or values), scales, zero points and outliers of one (b, h) of
// a source for tokens [first, end): the whole row when not paged (first 0, end unbounded), else one
// block. Token t's codes are at data + (t - first) * data.row_bytes(); its scale row is (t - first)
// / group rows (per-channel) or t - first rows (per-token) past `scale`; its outlier row (t - first)
// / otokens rows past `oidx` / `oval`.
struct Span {
  const char *data = nullptr, *scale = nullptr, *zero = nullptr, *oidx = nullptr, *oval = nullptr;
  int64_t first = 0, end = -1;  // end -1: nothing yet
};

inline Strided strided(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1 && t.device().is_cpu(),
              "kvsqueeze: expected a 4-D cpu tensor with a contiguous last dim");
  return {static_cast<const char*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.scalar_type(),
          static_cast<int64_t>(t.element_size()), {}};
}

inline float load_float(const char* base, at::ScalarType dtype, int64_t i) {
  switch (dtype) {
    case at::kHalf: return static_cast<float>(reinterpret_cast<const at::Half*>(base)[i]);
    case at::kBFloat16: return static_cast<float>(reinterpret_cast<const at::BFloat16*>(base)[i]);
    default: return reinterpret_cast<const float*>(base)[i];
  }
}

// `x` rounded to `dtype` and back (float16 / bfloat16; float32 unchanged).
inline float round_to(float x, at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return static_cast<float>(static_cast<at::Half>(x));
    case at::kBFloat16: return static_cast<float>(static_cast<at::BFloat16>(x));
    default: return x;
  }
}

// A contiguous float32 tensor of `rows` x `cols` (a rotation, a RoPE table); checks it.
inline const float* float_table(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                  (rows < 0 || t.size(0) == rows) && t.size(1) == cols,
              "kvsqueeze: ", what, " must be a contiguous float32 cpu tensor (", rows < 0 ? -1 : rows, ", ", cols,
              "); got ", t.sizes());
  return t.data_ptr<float>();
}

struct Source {
  int64_t kind = kExact, bits = 8, axis = 0, group = 1, mid = 0;
  Strided data, scale, zero, oidx, oval, pos;
  bool has_zero = false, has_outliers = false;
  int64_t otokens = 1, ocount = 0;
  const float* lut = nullptr;  // fp8 values or codebook levels
  // Transforms (attention only): rotation Q (D x D), RoPE table (rope_rows x D), positions.
  const float* rot = nullptr;
  const float* rope = nullptr;
  int64_t rope_rows = 0, pos_offset = 0;
  bool has_pos = false;
  // Paged sources: the table, its row stride, tokens and scale rows per block, the pool's layout.
  bool is_paged = false;
  const int32_t* table = nullptr;
  int64_t table_stride = 0, block = 0, scale_block = 0, per_slab = 1, slabs = 1, slab_stride = 0;

  Source(const std::vector<at::Tensor>& tensors, const int64_t* m, const at::Tensor& luts)
      : kind(m[kKind]), bits(m[kBits]), axis(m[kAxis]), group(m[kGroup]), mid(m[kMid]) {
    TORCH_CHECK(kind >= kExact && kind <= kCodebook, "kvsqueeze: unknown source kind ", kind);
    data = strided(tensors.at(m[kData]));
    if (m[kScale] >= 0) scale = strided(tensors.at(m[kScale]));
    if (m[kZero] >= 0) {
      zero = strided(tensors.at(m[kZero]));
      has_zero = true;
    }
    if (kind == kLut) lut = luts.data_ptr<float>() + 256 * m[kLutRow];
    if (kind == kCodebook) {
      TORCH_CHECK(bits >= 2 && bits <= 4, "kvsqueeze: codebook codes must have 2 to 4 bits");
      const at::Tensor& levels = tensors.at(m[kLutRow]);
      TORCH_CHECK(levels.scalar_type() == at::kFloat && levels.is_contiguous() && levels.numel() == (1 << bits) &&
                      levels.device().is_cpu(),
                  "kvsqueeze: codebook levels must be a contiguous float32 cpu tensor of 2**bits values");
      lut = levels.data_ptr<float>();
    }
    if (m[kOutIdx] >= 0) {
      oidx = strided(tensors.at(m[kOutIdx]));
      oval = strided(tensors.at(m[kOutVal]));
      has_outliers = true, otokens = m[kOutTokens], ocount = tensors.at(m[kOutIdx]).size(3);
      TORCH_CHECK(otokens > 0 && oidx.dtype == at::kShort && (oval.dtype == at::kHalf || oval.dtype == at::kFloat),
                  "kvsqueeze: outliers must be int16 positions and float16/float32 values per block of > 0 tokens");
    }
    if (m[kRot] >= 0) rot = tensors.at(m[kRot]).data_ptr<float>();  // shape checked in `check`
    if (m[kRope] >= 0) {
      rope = tensors.at(m[kRope]).data_ptr<float>();
      rope_rows = tensors.at(m[kRope]).size(0);
    }
    if (m[kPos] >= 0) {
      pos = strided(tensors.at(m[kPos]));
      has_pos = true;
    }
    pos_offset = m[kPosOffset];
    if (m[kTable] < 0) return;
    block = m[kBlock], per_slab = m[kPerSlab], slabs = m[kSlabs], slab_stride = m[kSlabStride];
    TORCH_CHECK(block > 0 && per_slab > 0 && slabs > 0 && slab_stride > 0 && group > 0,
                "kvsqueeze: paged source: block, per_slab, slabs and slab_stride must be positive");
    scale_block = axis == 1 ? block / group : block;
    const int64_t last = std::max({m[kData], m[kScale], m[kZero], m[kOutIdx], m[kOutVal]}) + (slabs - 1) * slab_stride;
    TORCH_CHECK(last < static_cast<int64_t>(tensors.size()) && m[kTable] < static_cast<int64_t>(tensors.size()),
                "kvsqueeze: paged source: slab or table index beyond the tensor list");
    const at::Tensor& tab = tensors.at(m[kTable]);
    TORCH_CHECK(tab.dim() == 2 && tab.scalar_type() == at::kInt && tab.device().is_cpu() &&
                    (tab.size(1) <= 1 || tab.stride(1) == 1),
                "kvsqueeze: block table must be a 2-D int32 cpu tensor with contiguous rows");
    is_paged = true, table = tab.data_ptr<int32_t>(), table_stride = tab.stride(0);
    const std::pair<Strided*, int64_t> held[] = {
        {&data, m[kData]}, {&scale, m[kScale]}, {&zero, m[kZero]}, {&oidx, m[kOutIdx]}, {&oval, m[kOutVal]}};
    for (const auto& [s, i] : held) {
      if (i < 0) continue;
      for (int64_t j = 0; j < slabs; ++j) {
        const at::Tensor& t = tensors.at(i + j * slab_stride);
        TORCH_CHECK(t.dim() == 4 && t.device().is_cpu() && t.scalar_type() == s->dtype && t.stride(1) == s->sh &&
                        t.stride(2) == s->st && t.stride(3) == 1,
                    "kvsqueeze: paged source: every slab must share slab 0's dtype and strides of dims 1-3");
        s->slabs.push_back({static_cast<const char*>(t.data_ptr()), t.stride(0)});
      }
    }
  }

  bool paged() const { return is_paged; }

  // Tokens from t to the end of its block (unbounded when not paged).
  int64_t run(int64_t t) const { return is_paged ? block - t % block : INT64_MAX; }

  // The span holding token t of (b, h): one table lookup when paged.
  Span span(int64_t b, int64_t h, int64_t t) const {
    if (!is_paged)
      return {data.addr(data.ptr, data.sb, b, h), scale.addr(scale.ptr, scale.sb, b, h),
              zero.addr(zero.ptr, zero.sb, b, h), oidx.addr(oidx.ptr, oidx.sb, b, h),
              oval.addr(oval.ptr, oval.sb, b, h), 0, INT64_MAX};
    const int64_t k = t / block, id = table[b * table_stride + k], s = id / per_slab, local = id - s * per_slab;
    auto base = [&](const Strided& x) {
      return x.slabs.empty() ? nullptr : x.addr(x.slabs[s].ptr, x.slabs[s].sb, local, h);
    };
    return {base(data), base(scale), base(zero), base(oidx), base(oval), k * block, (k + 1) * block};
  }

  // Scale row of token t in `sp`, counted from sp.scale.
  int64_t scale_row(const Span& sp, int64_t t) const { return axis == 1 ? (t - sp.first) / group : t - sp.first; }

  // Cache position of token t of (b, h) (pre-RoPE keys).
  int64_t position(int64_t b, int64_t h, int64_t t) const {
    if (!has_pos) return pos_offset + t;
    return reinterpret_cast<const int32_t*>(pos.ptr)[b * pos.sb + h * pos.sh + t * pos.st];
  }

  // Checks the shapes against (B, H, >= T tokens, D) before any pointer arithmetic.
  void check(const std::vector<at::Tensor>& tensors, const int64_t* m, int64_t B, int64_t H, int64_t T,
             int64_t D) const {
    check_transforms(tensors, m, B, H, T, D);
    if (is_paged) return check_paged(tensors, m, B, H, T, D);
    const at::Tensor& d = tensors.at(m[kData]);
    TORCH_CHECK(d.size(0) == B && d.size(1) == H && d.size(2) >= T, "kvsqueeze: source shape mismatch");
    check_columns(d, D);
    if (kind == kExact) return;
    const at::Tensor& s = tensors.at(m[kScale]);
    const int64_t rows = axis == 1 ? (T + group - 1) / group : T, cols = axis == 1 ? D : D / group;
    TORCH_CHECK(s.size(0) == B && s.size(1) == H && s.size(2) >= rows && s.size(3) == cols, "kvsqueeze: bad scales");
    if (has_zero) TORCH_CHECK(tensors.at(m[kZero]).sizes() == s.sizes(), "kvsqueeze: bad zero points");
    if (has_outliers) {
      const at::Tensor& oi = tensors.at(m[kOutIdx]);
      TORCH_CHECK(oi.size(0) == B && oi.size(1) == H && oi.size(2) * otokens >= T &&
                      tensors.at(m[kOutVal]).sizes() == oi.sizes(),
                  "kvsqueeze: outliers must be (B, H, >= T / otokens, count), positions and values alike");
    }
  }

 private:
  // dtype and last dim of the codes (or values), the group against head_dim.
  void check_columns(const at::Tensor& d, int64_t D) const {
    if (kind == kExact) {
      TORCH_CHECK(d.size(3) == D && (data.dtype == at::kFloat || data.dtype == at::kHalf || data.dtype == at::kBFloat16),
                  "kvsqueeze: exact values must be float (B, H, T, D)");
      return;
    }
    TORCH_CHECK(data.dtype == at::kByte && d.size(3) * 8 == D * bits && group > 0, "kvsqueeze: bad packed codes");
    TORCH_CHECK(axis == 1 || D % group == 0, "kvsqueeze: group must divide head_dim");
  }

  // Rotation (D, D), RoPE table (P, D) covering every position read, positions (B, H, >= T, 1) int32.
  void check_transforms(const std::vector<at::Tensor>& tensors, const int64_t* m, int64_t B, int64_t H, int64_t T,
                        int64_t D) const {
    if (m[kRot] >= 0) float_table(tensors.at(m[kRot]), D, D, "rotation");
    if (m[kRope] < 0) return;
    TORCH_CHECK(D % 2 == 0, "kvsqueeze: pre-RoPE keys need an even head_dim");
    float_table(tensors.at(m[kRope]), -1, D, "RoPE table");
    if (!has_pos) {
      TORCH_CHECK(pos_offset >= 0 && pos_offset + T <= rope_rows, "kvsqueeze: RoPE table of ", rope_rows,
                  " positions does not cover positions ", pos_offset, " to ", pos_offset + T - 1);
      return;
    }
    const at::Tensor& p = tensors.at(m[kPos]);
    TORCH_CHECK(pos.dtype == at::kInt && p.size(0) == B && p.size(1) == H && p.size(2) >= T && p.size(3) == 1,
                "kvsqueeze: positions must be int32 (B, H, >= T, 1); got ", p.sizes());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t x = position(b, h, t);
          TORCH_CHECK(x >= 0 && x < rope_rows, "kvsqueeze: position ", x, " outside the RoPE table of ", rope_rows,
                      " positions");
        }
  }

  // Paged: slabs (blocks, H, block rows, ...), all but the last of per_slab blocks; a table row per
  // batch row with at least T / block ids, each naming a block of the pool.
  void check_paged(const std::vector<at::Tensor>& tensors, const int64_t* m, int64_t B, int64_t H, int64_t T,
                   int64_t D) const {
    TORCH_CHECK(T % block == 0, "kvsqueeze: paged source: num_tokens ", T, " is not a multiple of the block size ",
                block);
    TORCH_CHECK(kind == kExact || axis == 0 || block % group == 0, "kvsqueeze: paged source: block size ", block,
                " is not a multiple of the per-channel group ", group);
    TORCH_CHECK(!has_outliers || block % otokens == 0, "kvsqueeze: paged source: block size ", block,
                " is not a multiple of the outlier block ", otokens);
    const int64_t cols = kind == kExact ? D : axis == 1 ? D : D / group;
    int64_t pool = 0;
    for (int64_t j = 0; j < slabs; ++j) {
      const at::Tensor& d = tensors.at(m[kData] + j * slab_stride);
      const int64_t n = d.size(0);
      TORCH_CHECK(j + 1 < slabs ? n == per_slab : (n >= 1 && n <= per_slab), "kvsqueeze: paged source: slab ", j,
                  " holds ", n, " blocks; allowed: ", per_slab, " (1 to ", per_slab, " for the last slab)");
      TORCH_CHECK(d.size(1) == H && d.size(2) == block, "kvsqueeze: paged source: slab ", j, " is ", d.sizes(),
                  "; expected (blocks, ", H, ", ", block, ", ...)");
      check_columns(d, D);
      for (int64_t i : {m[kScale], m[kZero]}) {
        if (i < 0) continue;
        const at::Tensor& s = tensors.at(i + j * slab_stride);
        TORCH_CHECK(s.size(0) == n && s.size(1) == H && s.size(2) == scale_block && s.size(3) == cols,
                    "kvsqueeze: paged source: slab ", j, " scales/zero points are ", s.sizes(), "; expected (", n,
                    ", ", H, ", ", scale_block, ", ", cols, ")");
      }
      for (int64_t i : {m[kOutIdx], m[kOutVal]}) {
        if (i < 0) continue;
        const at::Tensor& o = tensors.at(i + j * slab_stride);
        TORCH_CHECK(o.size(0) == n && o.size(1) == H && o.size(2) == block / otokens && o.size(3) == ocount,
                    "kvsqueeze: paged source: slab ", j, " outliers are ", o.sizes(), "; expected (", n, ", ", H,
                    ", ", block / otokens, ", ", ocount, ")");
      }
      pool += n;
    }
    const at::Tensor& tab = tensors.at(m[kTable]);
    const int64_t used = T / block;
    TORCH_CHECK(tab.size(0) == B && tab.size(1) >= used, "kvsqueeze: paged source: block table is ", tab.sizes(),
                "; expected (batch ", B, ", >= ", used, " blocks)");
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < used; ++k) {
        const int64_t id = table[b * table_stride + k];
        TORCH_CHECK(id >= 0 && id < pool, "kvsqueeze: paged source: block id ", id, " (row ", b, ", block ", k,
                    ") out of range; the pool holds ", pool, " blocks");
      }
  }
};

// One token's codes (planar layout, see kvsqueeze/quant/packing.py) as D bytes in channel order.
inline void unpack_bytes(const uint8_t* p, int64_t bits, int64_t D, uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out, p, D);
    return;
  }
  if (bits == 3) {
    const int64_t w = D / 8;
    for (int k = 0; k < 8; ++k)
      for (int64_t j = 0; j < w; ++j) {
        const uint32_t word = p[j] | (uint32_t(p[w + j]) << 8) | (uint32_t(p[2 * w + j]) << 16);
        out[k * w + j] = static_cast<uint8_t>((word >> (3 * k)) & 7u);
      }
    return;
  }
  const int n = 8 / static_cast<int>(bits), mask = (1 << bits) - 1;
  const int64_t w = D / n;
  for (int k = 0; k < n; ++k)
    for (int64_t j = 0; j < w; ++j) out[k * w + j] = static_cast<uint8_t>((p[j] >> (k * bits)) & mask);
}

// Unpack one token's codes (planar layout) into `out` as floats.
template <int BITS>
inline void unpack_planar(const uint8_t* p, int64_t D, float* out) {
  constexpr int n = 8 / BITS;
  constexpr int mask = (1 << BITS) - 1;
  const int64_t w = D / n;
  for (int k = 0; k < n; ++k) {
    float* o = out + k * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) o[j] = static_cast<float>((p[j] >> (k * BITS)) & mask);
  }
}

inline void unpack3(const uint8_t* p, int64_t D, float* out) {
  const int64_t w = D / 8;
  for (int k = 0; k < 8; ++k) {
    float* o = out + k * w;
    for (int64_t j = 0; j < w; ++j) {
      const uint32_t word = p[j] | (uint32_t(p[w + j]) << 8) | (uint32_t(p[2 * w + j]) << 16);
      o[j] = static_cast<float>((word >> (3 * k)) & 7u);
    }
  }
}

// The outliers of one block of `otokens` rows, bucketed by row: entries of row r are
// [first[r], first[r + 1]) of (channel, value).
class OutlierBlock {
 public:
  void load(const Source& src, const char* idx, const char* val, int64_t D) {
    const int64_t n = src.ocount, rows = src.otokens;
    first_.assign(rows + 1, 0);
    ch_.resize(n);
    val_.resize(n);
    const int16_t* ix = reinterpret_cast<const int16_t*>(idx);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = static_cast<uint16_t>(ix[i]) / D;
      TORCH_CHECK(r < rows, "kvsqueeze: outlier position ", ix[i], " beyond its block of ", rows, " x ", D);
      ++first_[r + 1];
    }
    for (int64_t r = 0; r < rows; ++r) first_[r + 1] += first_[r];
    std::vector<int64_t> at(first_.begin(), first_.end() - 1);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t flat = static_cast<uint16_t>(ix[i]), k = at[flat / D]++;
      ch_[k] = flat % D;
      val_[k] = load_float(val, src.oval.dtype, i);
    }
  }
  // Write the exact entries of row r (in its block) over `out` (D floats).
  void apply(int64_t r, float* out) const {
    for (int64_t k = first_[r]; k < first_[r + 1]; ++k) out[ch_[k]] = val_[k];
  }

 private:
  std::vector<int64_t> first_, ch_;
  std::vector<float> val_;
};

// Decodes tokens of one (batch, head) of a source into float rows of `D` values:
// x = fma(value(code), scale, offset), then the outliers written over it. With `params_dtype`
// float16 / bfloat16, scales, zero points and codebook levels are first rounded to that dtype, as
// the torch reference does when it dequantizes into a tensor of that dtype (so both give the same
// bits). Transforms (rotation, RoPE) are not applied here (see tile_generic.h).
class TileDecoder {
 public:
  TileDecoder(const Source& src, int64_t D, at::ScalarType params_dtype = at::kFloat)
      : src_(src), D_(D), params_dtype_(params_dtype), s_(D), o_(D), codes_(D), levels_(src.lut ? 256 : 0) {
    if (src.kind == kCodebook)
      for (int64_t i = 0; i < (1 << src.bits); ++i) levels_[i] = round_to(src.lut[i], params_dtype);
    if (src.kind == kLut) std::copy_n(src.lut, 256, levels_.begin());
  }

  // Tokens from t to the end of its block (unbounded when not paged).
  int64_t run(int64_t t) const { return src_.run(t); }

  // Rows [t0, t0 + n) of (b, h): a pointer to n * D floats, either into `buf` or into the source
  // (float32 rows of one block only). Paged rows are read block by block.
  const float* decode(int64_t b, int64_t h, int64_t t0, int64_t n, float* buf) {
    const Strided& d = src_.data;
    if (b != b_ || h != h_) {
      b_ = b, h_ = h, row_ = -1, span_ = Span{}, orow_ = nullptr;
    }
    if (src_.kind == kExact) {
      const Span& sp = span_at(t0);
      if (d.dtype == at::kFloat && d.st == D_ && t0 + n <= sp.end)
        return reinterpret_cast<const float*>(sp.data) + (t0 - sp.first) * D_;
      for (int64_t t = t0; t < t0 + n; ++t) {
        const Span& s = span_at(t);
        const char* row = s.data + (t - s.first) * d.row_bytes();
        float* out = buf + (t - t0) * D_;
#if defined(__AVX512F__)
        if (d.dtype == at::kHalf && D_ % 16 == 0) {  // float16 rows (exact parts of a float32 model)
          for (int64_t c = 0; c < D_; c += 16)
            _mm512_storeu_ps(out + c, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row) + c / 16)));
          continue;
        }
#endif
        for (int64_t c = 0; c < D_; ++c) out[c] = load_float(row, d.dtype, c);
      }
      return buf;
    }
    for (int64_t t = t0; t < t0 + n; ++t) {
      const Span& s = span_at(t);
      float* out = buf + (t - t0) * D_;
      unpack(reinterpret_cast<const uint8_t*>(s.data) + (t - s.first) * d.st, out);
      apply(s, t, out);
      if (src_.has_outliers) outliers(s, t, out);
    }
    return buf;
  }

 private:
  void unpack(const uint8_t* p, float* out) {
    if (src_.kind == kLut || src_.kind == kCodebook) {
      unpack_bytes(p, src_.kind == kLut ? 8 : src_.bits, D_, codes_.data());
      for (int64_t c = 0; c < D_; ++c) out[c] = levels_[codes_[c]];
      return;
    }
    switch (src_.bits) {
      case 2: unpack_planar<2>(p, D_, out); break;
      case 3: unpack3(p, D_, out); break;
      case 4: unpack_planar<4>(p, D_, out); break;
      default: unpack_planar<8>(p, D_, out); break;
    }
  }

  // The span of (b_, h_) holding token t (looked up again past its block).
  const Span& span_at(int64_t t) {
    if (t >= span_.end || t < span_.first) span_ = src_.span(b_, h_, t);
    return span_;
  }

  // Scale and offset of scale row `row` of span `sp` (cols values) into s_, o_.
  void load_row(const Span& sp, int64_t row, int64_t cols) {
    const at::ScalarType dtype = src_.scale.dtype;
    const char* sp_row = sp.scale + row * src_.scale.row_bytes();
    const char* zp = src_.has_zero ? sp.zero + row * src_.zero.row_bytes() : nullptr;
    for (int64_t c = 0; c < cols; ++c) {
      s_[c] = round_to(load_float(sp_row, dtype, c), params_dtype_);
      o_[c] = zp ? round_to(load_float(zp, dtype, c), params_dtype_) : -static_cast<float>(src_.mid) * s_[c];
    }
  }

  // Outlier entries of token t (span sp) written over `out`; the block's entries are bucketed once.
  void outliers(const Span& sp, int64_t t, float* out) {
    const int64_t r = (t - sp.first) / src_.otokens;
    const char* idx = sp.oidx + r * src_.oidx.row_bytes();
    if (idx != orow_) {
      block_.load(src_, idx, sp.oval + r * src_.oval.row_bytes(), D_);
      orow_ = idx;
    }
    block_.apply((t - sp.first) % src_.otokens, out);
  }

  void apply(const Span& sp, int64_t t, float* out) {
    if (src_.axis == 1) {  // per-channel: one scale per channel, shared by `group` tokens
      const int64_t row = t / src_.group;  // of (b_, h_); blocks hold whole groups
      if (row != row_) {
        load_row(sp, src_.scale_row(sp, t), D_);
        row_ = row;
      }
      const float* s = s_.data();
      const float* o = o_.data();
#pragma omp simd
      for (int64_t c = 0; c < D_; ++c) out[c] = std::fma(out[c], s[c], o[c]);
      return;
    }
    const int64_t g = src_.group, groups = D_ / g;  // per-token: one scale per `group` channels
    load_row(sp, t - sp.first, groups);
    for (int64_t k = 0; k < groups; ++k) {
      const float s = s_[k], o = o_[k];
      float* x = out + k * g;
#pragma omp simd
      for (int64_t c = 0; c < g; ++c) x[c] = std::fma(x[c], s, o);
    }
  }

  const Source& src_;
  int64_t D_;
  at::ScalarType params_dtype_;
  std::vector<float> s_, o_;
  std::vector<uint8_t> codes_;
  std::vector<float> levels_;
  int64_t b_ = -1, h_ = -1, row_ = -1;
  Span span_;
  const char* orow_ = nullptr;  // outlier row bucketed in block_
  OutlierBlock block_;
};

}  // namespace kvsqueeze
