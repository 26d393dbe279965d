// Tile decoding: one K or V source of one segment (exact or packed), a few tokens at a time.
//
// A source is described by a row of `kMetaFields` int64 values built in Python
// (kvsqueeze/kernels/segments.py) plus the tensors it names by index:
//   kind   0 exact values (float32 / float16 / bfloat16), 1 integer codes, 2 codes through a LUT (fp8)
//   bits   2, 3, 4 or 8 (packed "planar" layout, see kvsqueeze/quant/packing.py)
//   axis   0 per-token groups (scale (B, H, T, D/g)), 1 per-channel groups (scale (B, H, T/g, D))
//   group  group size
//   mid    code offset of symmetric codes: x = (code - mid) * scale; 0 otherwise
//   data, scale, zero   indices into the tensor list (-1: absent)
//   lut    row of the LUT tensor (256 floats per row) for kind 2
// Dequantized value: x = value(code) * scale + offset, offset = zero if present else -mid * scale.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace kvsqueeze {

constexpr int kMetaFields = 9;
enum Kind : int64_t { kExact = 0, kInt = 1, kLut = 2 };

struct Strided {
  const char* ptr = nullptr;
  int64_t sb = 0, sh = 0, st = 0;  // strides of dims 0, 1, 2, in elements
  at::ScalarType dtype = at::kFloat;
};

inline Strided strided(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1 && t.device().is_cpu(),
              "kvsqueeze: expected a 4-D cpu tensor with a contiguous last dim");
  return {static_cast<const char*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.scalar_type()};
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

inline int64_t element_bytes(at::ScalarType dtype) { return static_cast<int64_t>(c10::elementSize(dtype)); }

struct Source {
  int64_t kind = kExact, bits = 8, axis = 0, group = 1, mid = 0;
  Strided data, scale, zero;
  bool has_zero = false;
  const float* lut = nullptr;

  Source(const std::vector<at::Tensor>& tensors, const int64_t* m, const at::Tensor& luts)
      : kind(m[0]), bits(m[1]), axis(m[2]), group(m[3]), mid(m[4]) {
    data = strided(tensors.at(m[5]));
    if (m[6] >= 0) scale = strided(tensors.at(m[6]));
    if (m[7] >= 0) {
      zero = strided(tensors.at(m[7]));
      has_zero = true;
    }
    if (kind == kLut) lut = luts.data_ptr<float>() + 256 * m[8];
  }

  // Checks the shapes against (B, H, >= T tokens, D) before any pointer arithmetic.
  void check(const std::vector<at::Tensor>& tensors, const int64_t* m, int64_t B, int64_t H, int64_t T,
             int64_t D) const {
    const at::Tensor& d = tensors.at(m[5]);
    TORCH_CHECK(d.size(0) == B && d.size(1) == H && d.size(2) >= T, "kvsqueeze: source shape mismatch");
    if (kind == kExact) {
      TORCH_CHECK(d.size(3) == D && (data.dtype == at::kFloat || data.dtype == at::kHalf || data.dtype == at::kBFloat16),
                  "kvsqueeze: exact values must be float (B, H, T, D)");
      return;
    }
    TORCH_CHECK(data.dtype == at::kByte && d.size(3) * 8 == D * bits && group > 0, "kvsqueeze: bad packed codes");
    const at::Tensor& s = tensors.at(m[6]);
    const int64_t rows = axis == 1 ? (T + group - 1) / group : T, cols = axis == 1 ? D : D / group;
    TORCH_CHECK(axis == 1 || D % group == 0, "kvsqueeze: group must divide head_dim");
    TORCH_CHECK(s.size(0) == B && s.size(1) == H && s.size(2) >= rows && s.size(3) == cols, "kvsqueeze: bad scales");
    if (has_zero) TORCH_CHECK(tensors.at(m[7]).sizes() == s.sizes(), "kvsqueeze: bad zero points");
  }
};

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

// Decodes tokens of one (batch, head) of a source into float rows of `D` values:
// x = fma(value(code), scale, offset). With `params_dtype` float16 / bfloat16, scales and zero
// points are first rounded to that dtype, as the torch reference does when it dequantizes into a
// tensor of that dtype (so both give the same bits).
class TileDecoder {
 public:
  TileDecoder(const Source& src, int64_t D, at::ScalarType params_dtype = at::kFloat)
      : src_(src), D_(D), params_dtype_(params_dtype), s_(D), o_(D) {}

  // Rows [t0, t0 + n) of (b, h): a pointer to n * D floats, either into `buf` or into the source.
  const float* decode(int64_t b, int64_t h, int64_t t0, int64_t n, float* buf) {
    const Strided& d = src_.data;
    if (src_.kind == kExact) {
      const int64_t es = element_bytes(d.dtype);
      const char* base = d.ptr + (b * d.sb + h * d.sh) * es;
      if (d.dtype == at::kFloat && d.st == D_) return reinterpret_cast<const float*>(base) + t0 * D_;
      for (int64_t t = 0; t < n; ++t) {
        const char* row = base + (t0 + t) * d.st * es;
        for (int64_t c = 0; c < D_; ++c) buf[t * D_ + c] = load_float(row, d.dtype, c);
      }
      return buf;
    }
    if (b != b_ || h != h_) {
      b_ = b, h_ = h, row_ = -1;
    }
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(d.ptr) + b * d.sb + h * d.sh;
    for (int64_t t = 0; t < n; ++t) {
      float* out = buf + t * D_;
      unpack(codes + (t0 + t) * d.st, out);
      apply(b, h, t0 + t, out);
    }
    return buf;
  }

 private:
  void unpack(const uint8_t* p, float* out) const {
    switch (src_.kind == kLut ? 0 : src_.bits) {
      case 0:
        for (int64_t c = 0; c < D_; ++c) out[c] = src_.lut[p[c]];
        break;
      case 2: unpack_planar<2>(p, D_, out); break;
      case 3: unpack3(p, D_, out); break;
      case 4: unpack_planar<4>(p, D_, out); break;
      default: unpack_planar<8>(p, D_, out); break;
    }
  }

  // Scale and offset of scale row `row` (cols values) into s_, o_.
  void load_row(int64_t b, int64_t h, int64_t row, int64_t cols) {
    const Strided& s = src_.scale;
    const int64_t es = element_bytes(s.dtype);
    const char* sp = s.ptr + (b * s.sb + h * s.sh + row * s.st) * es;
    const char* zp = src_.has_zero ? src_.zero.ptr + (b * s.sb + h * s.sh + row * s.st) * es : nullptr;
    for (int64_t c = 0; c < cols; ++c) {
      s_[c] = round_to(load_float(sp, s.dtype, c), params_dtype_);
      o_[c] = zp ? round_to(load_float(zp, s.dtype, c), params_dtype_) : -static_cast<float>(src_.mid) * s_[c];
    }
  }

  void apply(int64_t b, int64_t h, int64_t t, float* out) {
    if (src_.axis == 1) {  // per-channel: one scale per channel, shared by `group` tokens
      const int64_t row = t / src_.group;
      if (row != row_) {
        load_row(b, h, row, D_);
        row_ = row;
      }
      const float* s = s_.data();
      const float* o = o_.data();
#pragma omp simd
      for (int64_t c = 0; c < D_; ++c) out[c] = std::fma(out[c], s[c], o[c]);
      return;
    }
    const int64_t g = src_.group, groups = D_ / g;  // per-token: one scale per `group` channels
    load_row(b, h, t, groups);
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
  int64_t b_ = -1, h_ = -1, row_ = -1;
};

}  // namespace kvsqueeze
