// TEST STUB (tests/cuda_stubs/README.md): the part of c10/cuda/CUDAStream.h that csrc/cuda/attention_pool_binding.cpp
// uses, for its build over the CPU emulation of the kernels: the current stream is the emulation's null stream
// (the emulated launchers run each launch to completion on the calling thread) and the current device is 0.
#pragma once

#include <c10/core/Device.h>

typedef struct CUstream_st* cudaStream_t;  // as csrc/cuda/cpu_emulation/cuda_runtime.h and the CUDA runtime

namespace c10::cuda {

class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }
inline c10::DeviceIndex current_device() { return 0; }

}  // namespace c10::cuda
