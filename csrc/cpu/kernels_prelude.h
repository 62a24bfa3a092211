// Every header the kernels need, included by each kernels_<isa>.cpp BEFORE it switches the instruction set,
// so that no function of these headers is compiled for AVX2 (an inline function compiled with AVX2 in one
// file and without in another could be merged by the linker into the AVX2 copy, and crash on older CPUs).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "kernel_api.h"
