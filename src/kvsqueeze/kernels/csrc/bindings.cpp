// Python bindings of the CPU kernels (built at first use by kvsqueeze/kernels/cpu.py).
#include <torch/extension.h>

#include <vector>

namespace kvsqueeze {
at::Tensor fused_attention(const at::Tensor& query, const std::vector<at::Tensor>& tensors,
                           const std::vector<int64_t>& meta, const std::vector<int64_t>& seg_tokens,
                           const c10::optional<at::Tensor>& mask, double scaling, bool causal,
                           const at::Tensor& luts, const c10::optional<at::Tensor>& sinks);
void dequantize_into(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta,
                     int64_t num_tokens, at::Tensor& out, const at::Tensor& luts);
}  // namespace kvsqueeze

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_attention", &kvsqueeze::fused_attention, "Attention over exact and packed K/V segments");
  m.def("dequantize_into", &kvsqueeze::dequantize_into,
        "Dequantize one packed page (or a paged part) into a float tensor");
}
