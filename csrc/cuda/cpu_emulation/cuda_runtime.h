// CPU emulation of the slice of CUDA that csrc/cuda/attention_pool_kernels.cu uses, for tests on machines without
// a GPU (tests/test_cuda_compile.py builds that file with g++ -DFA_CPU_EMULATION -I<this folder>).
//
// The blocks of a launch run one after another. The threads of a block run as fibers (ucontext) on the calling
// thread, switched round-robin: __syncthreads and the warp shuffles are real barriers among them, so a kernel
// that reads shared memory before the barrier that orders it, or that shuffles in a divergent warp, hangs or
// reads stale values here too. __shared__ becomes `static`: the block's shared memory, as one block runs at a
// time. What this cannot show: the GPU's memory model beyond these barriers, timing, the device compiler.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <math.h>

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 gridDim;
inline dim3 blockDim;

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error (CPU emulation)";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (CPU emulation)";
    default:
      return "invalid value (CPU emulation)";
  }
}

namespace fa_emulation {

inline int multiprocessors = 4;  // what cudaDeviceGetAttribute reports

struct Barrier {
  unsigned participants = 0, arrived = 0, generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;  // allocated once, reused by every block (no zeroing, no page faults again)
  bool done = false;
  const Barrier* waiting_on = nullptr;  // the scheduler resumes the fiber once this barrier's generation moves
  unsigned waiting_generation = 0;
};

constexpr size_t kStackBytes = 64 * 1024;

struct Block {
  explicit Block(std::vector<Fiber>& pool) : fibers(pool) {}
  ucontext_t scheduler;
  std::vector<Fiber>& fibers;
  unsigned running = 0;
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<uint64_t> slots;  // one shuffle value per thread
  void (*body)(const void*) = nullptr;
  const void* params = nullptr;
};

inline Block* current = nullptr;

inline void yield() { swapcontext(&current->fibers[current->running].context, &current->scheduler); }

inline void wait(Barrier& barrier) {
  const unsigned generation = barrier.generation;
  if (++barrier.arrived == barrier.participants) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  Fiber& fiber = current->fibers[current->running];
  fiber.waiting_on = &barrier;
  fiber.waiting_generation = generation;
  while (barrier.generation == generation) yield();
  fiber.waiting_on = nullptr;
}

inline void fiber_entry() {
  current->body(current->params);
  current->fibers[current->running].done = true;
}  // returns to uc_link: the scheduler

inline std::vector<Fiber>& fiber_pool(unsigned threads) {
  static std::vector<Fiber> fibers;
  if (fibers.size() < threads) fibers.resize(threads);
  return fibers;
}

inline void run_block(Block& block, unsigned threads) {
  block.all.participants = threads;
  block.warps.assign((threads + 31) / 32, Barrier{32, 0, 0});
  block.slots.assign(threads, 0);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& fiber = block.fibers[t];
    if (!fiber.stack) fiber.stack.reset(new char[kStackBytes]);
    fiber.done = false;
    fiber.waiting_on = nullptr;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = &block.scheduler;
    makecontext(&fiber.context, fiber_entry, 0);
  }
  for (unsigned finished = 0; finished < threads;) {
    finished = 0;
    for (unsigned t = 0; t < threads; ++t) {
      const Fiber& fiber = block.fibers[t];
      if (fiber.done) {
        ++finished;
        continue;
      }
      if (fiber.waiting_on != nullptr && fiber.waiting_on->generation == fiber.waiting_generation) continue;
      block.running = t;
      threadIdx = dim3(t);
      swapcontext(&block.scheduler, &block.fibers[t].context);
    }
  }
}

template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, unsigned threads, const Params& params) {
  static void (*the_kernel)(Params) = nullptr;
  the_kernel = kernel;
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block block(fiber_pool(threads));
      block.params = &params;
      block.body = [](const void* p) { the_kernel(*static_cast<const Params*>(p)); };
      blockIdx = dim3(bx, by);
      current = &block;
      run_block(block, threads);
      current = nullptr;
    }
  }
}

}  // namespace fa_emulation

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = fa_emulation::multiprocessors;
  return cudaSuccess;
}

inline void __syncthreads() { fa_emulation::wait(fa_emulation::current->all); }

// The threads of a block take turns on one host thread (and the blocks run one after another): a plain
// read-modify-write is atomic here.
inline int atomicOr(int* address, int value) {
  const int old = *address;
  *address = old | value;
  return old;
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  fa_emulation::Block& block = *fa_emulation::current;
  const unsigned me = threadIdx.x, warp_base = me & ~31u;
  fa_emulation::Barrier& warp = block.warps[me / 32];
  std::memcpy(&block.slots[me], &value, sizeof(T));
  fa_emulation::wait(warp);
  T other;
  std::memcpy(&other, &block.slots[warp_base + ((me & 31u) ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  fa_emulation::wait(warp);  // nobody overwrites a slot before every lane has read
  return other;
}
