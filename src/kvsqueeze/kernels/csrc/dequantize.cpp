// Dequantize one packed source (a page, or a paged part read through its block table) into a
// preallocated float tensor: the native half of the reference read path. out (B, H, T, D),
// float32 / float16 / bfloat16, last dim contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "decode.h"

namespace kvsqueeze {

namespace {
constexpr int64_t kChunk = 64;  // tokens per work item

template <typename scalar_t>
void store_rows(const float* rows, int64_t n, int64_t D, scalar_t* dst, int64_t row_stride) {
  for (int64_t t = 0; t < n; ++t) {
    scalar_t* d = dst + t * row_stride;
    const float* s = rows + t * D;
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<scalar_t>(s[c]);
  }
}
}  // namespace

void dequantize_into(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta,
                     int64_t num_tokens, at::Tensor& out, const at::Tensor& luts) {
  TORCH_CHECK(static_cast<int64_t>(meta.size()) == kMetaFields, "kvsqueeze: bad meta");
  TORCH_CHECK(out.dim() == 4 && out.stride(3) == 1 && out.size(2) == num_tokens,
              "kvsqueeze: out must be (B, H, num_tokens, D) with a contiguous last dim");
  const Source src(tensors, meta.data(), luts);
  const int64_t B = out.size(0), H = out.size(1), D = out.size(3);
  src.check(tensors, meta.data(), B, H, num_tokens, D);
  const int64_t chunks = (num_tokens + kChunk - 1) / kChunk;
  const int64_t items = B * H * chunks;
  const bool small = B * H * num_tokens < 1024;  // a fork/join would cost more than the work
  const int64_t threads = small ? 1 : std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, items));
#pragma omp parallel num_threads(threads)
  {
    TileDecoder dec(src, D, out.scalar_type());
    std::vector<float> buf(kChunk * D);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t c = item % chunks, h = (item / chunks) % H, b = item / chunks / H;
      const int64_t t0 = c * kChunk, n = std::min(kChunk, num_tokens - t0);
      const float* rows = dec.decode(b, h, t0, n, buf.data());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "kvsqueeze_dequantize", [&] {
        scalar_t* o = out.data_ptr<scalar_t>() + b * out.stride(0) + h * out.stride(1) + t0 * out.stride(2);
        store_rows<scalar_t>(rows, n, D, o, out.stride(2));
      });
    }
  }
}

}  // namespace kvsqueeze
