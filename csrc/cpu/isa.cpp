#include "isa.h"

#include <cstdlib>
#include <cstring>

namespace fused_attn_at::cpu {
namespace {

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
#else
  return false;
#endif
}

bool use_avx2() {
  const char* forced = std::getenv("FUSED_ATTN_AT_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return false;
  return cpu_has_avx2() && kernels_avx2(Dtype::f32) != nullptr;
}

}  // namespace

const Kernels& select_kernels(Dtype dtype) {
  if (use_avx2()) return *kernels_avx2(dtype);
  return kernels_portable(dtype);
}

const char* selected_isa_name() { return use_avx2() ? "avx2" : "default"; }

}  // namespace fused_attn_at::cpu
