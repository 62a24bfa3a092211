// Which build of the CPU kernels runs: AVX2 where the CPU has AVX2, FMA and F16C, else the portable one.
// FUSED_ATTN_AT_CPU_ISA=default (read at every call) forces the portable build, e.g. to test it.
#pragma once

#include "kernel_api.h"

namespace fused_attn_at::cpu {

const Kernels& select_kernels(Dtype dtype);
// "avx2" or "default": what select_kernels picks now.
const char* selected_isa_name();

}  // namespace fused_attn_at::cpu
