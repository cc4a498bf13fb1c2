// Runs the CUDA kernels of cuda.cu on the host, so their indexing, packing,
// block reductions and barriers are tested on machines without a GPU.
// Test-only (tests/unit/test_masked_norm_cuda_emulated.py builds it).
//
// Each CUDA thread of a block is a fiber (ucontext) on one host thread; blocks
// run one after another, so `__shared__` can be a function-local static.
// __syncthreads is a barrier over the block's fibers, __shfl_xor_sync a
// barrier over the warp's around a shared buffer. A fiber that returns drops
// out of its barriers, as an exited CUDA thread does; a barrier nobody can
// reach any more (a divergent __syncthreads) aborts instead of hanging.
// Launches `k<<<grid, block, smem, stream>>>(args)` are rewritten by the test
// into `emu::launch(grid, block, smem, stream)(k, args)`.
#pragma once

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

constexpr unsigned kWarp = 32;
constexpr size_t kStackBytes = 64 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  dim3 tid;
  bool done = false;
};

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  unsigned current = 0;
  unsigned long long events = 0;  // arrivals, releases, exits: progress
  std::function<void()> body;
  unsigned long long rng = 0x9E3779B97F4A7C15ull;  // fixed seed: runs are reproducible

  unsigned next_random() {  // xorshift64
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return static_cast<unsigned>(rng >> 32);
  }
};

inline Scheduler* sched = nullptr;

inline void yield() { swapcontext(&sched->fibers[sched->current].ctx, &sched->main); }

struct Barrier {
  int expected = 0;
  int arrived = 0;
  unsigned generation = 0;

  void release_if_complete() {
    if (arrived > 0 && arrived == expected) {
      arrived = 0;
      ++generation;
      ++sched->events;
    }
  }
  void wait() {
    const unsigned g = generation;
    ++arrived;
    ++sched->events;
    release_if_complete();
    while (generation == g) yield();
  }
  void drop() {
    --expected;
    release_if_complete();
  }
};

struct BlockSync {
  Barrier block;
  std::vector<Barrier> warps;
  float shfl[1024] = {};
};

inline BlockSync* block_sync = nullptr;

inline unsigned linear_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

inline void fiber_entry() {
  sched->body();
  const unsigned t = linear_tid();
  block_sync->warps[t / kWarp].drop();
  block_sync->block.drop();
  sched->fibers[sched->current].done = true;
  ++sched->events;
}  // returns to uc_link: the scheduler

inline void run_block(Scheduler& s, unsigned n) {
  BlockSync bs;
  bs.block.expected = static_cast<int>(n);
  for (unsigned w = 0; w * kWarp < n; ++w) {
    Barrier b;
    b.expected = static_cast<int>(n - w * kWarp < kWarp ? n - w * kWarp : kWarp);
    bs.warps.push_back(b);
  }
  block_sync = &bs;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    f.done = false;
    f.tid = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &s.main;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // Adversarial but reproducible order: one random warp is held back while the
  // others run until they all wait on it, then everyone runs one pass. A warp
  // thus lags as far behind as the barriers allow, so a missing barrier shows
  // up as a wrong result.
  const unsigned warps = (n + kWarp - 1) / kWarp;
  unsigned held = s.next_random() % warps;
  bool everyone = warps == 1;
  for (unsigned live = n; live > 0;) {
    const unsigned long long before = s.events;
    live = 0;
    for (unsigned t = 0; t < n; ++t) {
      if (s.fibers[t].done) continue;
      if (everyone || t / kWarp != held) {
        s.current = t;
        threadIdx = s.fibers[t].tid;
        swapcontext(&s.main, &s.fibers[t].ctx);
      }
      live += s.fibers[t].done ? 0 : 1;
    }
    const bool idle = s.events == before;
    if (live > 0 && idle && everyone) {
      std::fprintf(stderr, "emulated CUDA: deadlock (a barrier some threads cannot reach)\n");
      std::abort();
    }
    if (idle) {
      everyone = true;
    } else if (everyone && warps > 1) {
      everyone = false;
      held = s.next_random() % warps;
    }
  }
}

inline cudaError_t last_error = cudaSuccess;

struct Launch {
  dim3 grid;
  dim3 block;

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A... args) const {
    const unsigned n = block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || n == 0 ||
        n > 1024) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    gridDim = grid;
    blockDim = block;
    Scheduler s;
    s.fibers.resize(n);
    for (Fiber& f : s.fibers) f.stack.reset(new char[kStackBytes]);
    s.body = [&] { kernel(static_cast<P>(args)...); };
    sched = &s;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = dim3(bx, by, bz);
          run_block(s, n);
        }
    sched = nullptr;
  }
};

inline Launch launch(dim3 grid, dim3 block, std::size_t /*smem*/, cudaStream_t /*stream*/) {
  return Launch{grid, block};
}

}  // namespace emu

inline void __syncthreads() { emu::block_sync->block.wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int offset) {
  const unsigned t = emu::linear_tid();
  emu::Barrier& warp = emu::block_sync->warps[t / emu::kWarp];
  emu::block_sync->shfl[t] = v;
  warp.wait();
  const float other = emu::block_sync->shfl[t ^ static_cast<unsigned>(offset)];
  warp.wait();
  return other;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::last_error;
  emu::last_error = cudaSuccess;
  return err;
}

inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : "emulated launch error";
}
