"""Optional fast kernels; importing this package builds and loads nothing.

* `cpu` — C++/OpenMP kernels in ``csrc/``, built at first use (`build.cpu_extension`): fused
  attention over packed pages and exact segments, and page dequantization for the reference path;
* `triton_attention` — the CUDA path, used only when triton is installed;
* `dequantize` — page dequantization, native when available, else ``PackedTensor.dequantize``.

Every kernel has a reference path with the same result (tests/test_fused.py compares them).
"""
