// The kernels for the compiler's baseline instruction set (SSE2 on x86-64, NEON on arm64): always built,
// used where the CPU lacks AVX2/FMA/F16C or when FUSED_ATTN_AT_CPU_ISA=default.
#include "kernels_prelude.h"

#define FAA_ISA portable
#define FAA_VEC_BYTES 16
#include "kernels.h"

namespace fused_attn_at::cpu {
const Kernels& kernels_portable(Dtype dtype) { return portable::table(dtype); }
}  // namespace fused_attn_at::cpu
