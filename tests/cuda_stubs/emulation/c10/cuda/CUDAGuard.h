// TEST STUB (tests/cuda_stubs/README.md): the part of c10/cuda/CUDAGuard.h that csrc/cuda/attention_pool_binding.cpp
// uses, for its build over the CPU emulation of the kernels, where tensors live on the CPU and no CUDA device
// exists. The real header is compiled by the -fsyntax-only check against torch's CUDA headers.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) : original_device(device) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  c10::Device original_device;
};

}  // namespace c10::cuda
