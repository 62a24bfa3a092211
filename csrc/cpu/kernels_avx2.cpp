// The kernels compiled for AVX2 + FMA + F16C (x86-64 with GCC or Clang), picked at run time by isa.cpp when
// the CPU has them. Only the functions of kernels.h are compiled for AVX2: every header is included first
// (kernels_prelude.h), so no torch/std inline function gets an AVX2 copy that the linker could share.
#include "kernels_prelude.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define FAA_ISA avx2
#define FAA_VEC_BYTES 32
#define FAA_F16C 1
#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace fused_attn_at::cpu {
// Compiled for the baseline: the caller asks for the table only after checking the CPU.
const Kernels* kernels_avx2(Dtype dtype) { return &avx2::table(dtype); }
}  // namespace fused_attn_at::cpu

#else

namespace fused_attn_at::cpu {
const Kernels* kernels_avx2(Dtype) { return nullptr; }
}  // namespace fused_attn_at::cpu

#endif
