// Python bindings of the CPU kernels (built at first use by kvsqueeze/kernels/cpu.py).
#include <torch/extension.h>

#include <vector>

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
}
