// Run-time choice of the key dot product of the fast tile reader (tile_packed.h):
//   kFloat  float32 algebra on the codes (q (.) s) . c + q . o: any CPU, the reference-faithful one;
//   kVnni   the scaled query quantized to int8 per row and key group, dotted with the unsigned codes
//           by AVX-512 VNNI (vpdpbusd, 64 products per instruction);
//   kAvx2   the same through AVX2 vpmaddubsw + vpmaddwd (8-bit keys: queries on 7 bits, as the 16-bit
//           pair sums would saturate).
// `available_key_dot` is what this build and this CPU can run (compile-time flags, then cpuid);
// `key_dot_setting` is the process-wide choice (kvsqueeze.kernels.cpu.set_key_dot), initially the
// best available.
#pragma once

#include <atomic>

#include "simd.h"

namespace kvsqueeze {

enum KeyDot : int { kFloat = 0, kAvx2 = 1, kVnni = 2 };

inline bool key_dot_available(int dot) {
  switch (dot) {
    case kFloat: return true;
    case kAvx2:
#if defined(KVSQ_AVX2)
      return __builtin_cpu_supports("avx2");
#else
      return false;
#endif
    case kVnni:
#if defined(KVSQ_VNNI)
      return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
#else
      return false;
#endif
    default: return false;
  }
}

inline int best_key_dot() {
  for (int dot : {kVnni, kAvx2})
    if (key_dot_available(dot)) return dot;
  return kFloat;
}

inline std::atomic<int>& key_dot_setting() {
  static std::atomic<int> setting{best_key_dot()};
  return setting;
}

}  // namespace kvsqueeze
