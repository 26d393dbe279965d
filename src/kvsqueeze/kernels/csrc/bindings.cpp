// Python bindings of the CPU kernels (built at first use by kvsqueeze/kernels/build.py).
#include <torch/extension.h>

#include <vector>

#include "dispatch.h"

namespace kvsqueeze {
at::Tensor fused_attention(const at::Tensor& query, const std::vector<at::Tensor>& tensors,
                           const std::vector<int64_t>& meta, const std::vector<int64_t>& seg_tokens,
                           const c10::optional<at::Tensor>& mask, double scaling, bool causal,
                           const at::Tensor& luts, const c10::optional<at::Tensor>& sinks);
std::vector<at::Tensor> fused_attention_many(const std::vector<at::Tensor>& queries,
                                             const std::vector<std::vector<at::Tensor>>& tensors,
                                             const std::vector<std::vector<int64_t>>& metas,
                                             const std::vector<std::vector<int64_t>>& seg_tokens, double scaling,
                                             const at::Tensor& luts);
void dequantize_into(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta,
                     int64_t num_tokens, at::Tensor& out, const at::Tensor& luts);
}  // namespace kvsqueeze

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_attention", &kvsqueeze::fused_attention, "Attention over exact and packed K/V segments");
  m.def("fused_attention_many", &kvsqueeze::fused_attention_many,
        "Causal attention of several independent queries, each over its own segments, in one call");
  m.def("dequantize_into", &kvsqueeze::dequantize_into,
        "Dequantize one packed page (or a paged part) into a float tensor");
  m.def(
      "key_dot_available", [](int dot) { return kvsqueeze::key_dot_available(dot); },
      "Whether this build and CPU run key dot product `dot` (0 float, 1 avx2 int8, 2 avx512-vnni int8)");
  m.def(
      "key_dot", [] { return kvsqueeze::key_dot_setting().load(); }, "The key dot product in use");
  m.def(
      "set_key_dot",
      [](int dot) {
        TORCH_CHECK(kvsqueeze::key_dot_available(dot), "kvsqueeze: key dot ", dot, " is not available here");
        return kvsqueeze::key_dot_setting().exchange(dot);
      },
      "Select the key dot product for later calls; returns the previous one");
}
