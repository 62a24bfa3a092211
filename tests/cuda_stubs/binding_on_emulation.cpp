// TEST ONLY (tests/cuda_stubs/README.md): csrc/cuda/attention_pool_binding.cpp itself, built into a library that
// torch can load on a machine without a GPU. The kernels it calls are csrc/cuda/attention_pool_kernels.cu built
// against the CPU emulation of CUDA (linked in), the shared input checks come from the package's fused_attn_at._C
// (linked in), and c10/cuda/CUDAGuard.h / CUDAStream.h are the stubs of emulation/. Two changes, both here:
//
// 1. CPU tensors stand in for CUDA tensors (the emulated kernels read host memory): the binding's one device
//    test, x.is_cuda() in check_cuda, reads x.is_cpu() in this build.
// 2. The binding's registration block (TORCH_LIBRARY_IMPL(fused_attn_at, CUDA, m) { ... }) becomes the function
//    fa_binding_impls, run below for the ops of this library (namespace fused_attn_at_cuda_emulated, CPU key, the
//    schemas of csrc/ops.cpp copied by the test into ops_schemas.inc), not for fused_attn_at's CUDA key, which a
//    CUDA build of the package may own in the same process. m.impl still checks each function against its schema.
#include <ATen/ATen.h>
#include <torch/library.h>  // #pragma once: the binding's own #include of it is a no-op below

#define is_cuda is_cpu
#pragma push_macro("TORCH_LIBRARY_IMPL")
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) static void fa_binding_impls(torch::Library& m)

#include "attention_pool_binding.cpp"

#pragma pop_macro("TORCH_LIBRARY_IMPL")
#undef is_cuda

TORCH_LIBRARY(fused_attn_at_cuda_emulated, m) {
#include "ops_schemas.inc"
}

TORCH_LIBRARY_IMPL(fused_attn_at_cuda_emulated, CPU, m) { fa_binding_impls(m); }
