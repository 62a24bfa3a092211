// TEST STUB (tests/cuda_stubs/README.md): the header that torch's CMake generates for a CUDA build and that a CPU
// wheel of torch lacks; c10/cuda/CUDAMacros.h includes it. This is its content in a CUDA build of torch.
#pragma once

#define C10_CUDA_BUILD_SHARED_LIBS
