// Just enough of the CUDA execution model to run fusedopt's kernels (../fused_step_kernels.cu,
// compiled unchanged as host C++ with FUSEDOPT_EMULATED_CUDA defined) on the CPU, so that CI,
// which has no GPU, executes them and compares them with torch.optim.
//
// The real cuda_runtime.h / cuda_fp16.h / cuda_bf16.h work in host mode: __global__ and
// __device__ expand to nothing and the half types convert on the host. What this header adds:
//   - threadIdx / blockIdx / blockDim / gridDim: per-thread values (thread_local);
//   - one CPU thread per CUDA thread (from a pool of persistent workers), a std::barrier per
//     block for __syncthreads, from which a returning thread drops out (as exited threads do on
//     the GPU);
//   - per-block shared memory, for kernels that declare it through block_shared<T>();
//   - __threadfence as a seq_cst fence (the kernels' atomics are libcu++'s cuda::atomic_ref,
//     which runs on the host as std::atomic_ref does);
//   - launch(kernel, grid, block, args): blocks all at once, or one at a time in a shuffled
//     order, so that a kernel relying on block order or timing fails a test.
// What it cannot show: the GPU memory model and warps, FMA contraction and other nvcc rounding,
// registers and occupancy, and anything of the host glue (streams, graphs, uploads).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <semaphore>
#include <thread>
#include <vector>

namespace fusedopt_emulation {

struct ThreadIndex {
  uint3 thread{0, 0, 0};
  uint3 block{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
  std::barrier<>* barrier = nullptr;
  void* shared = nullptr;  // the block's shared memory (kSharedBytes)
};

// Shared memory per block (block_shared<T>() below).
constexpr size_t kSharedBytes = 48 * 1024;

inline thread_local ThreadIndex current;

// The calling block's shared memory. A kernel declares its shared variables as one struct through
// block_shared<T>() (see FUSEDOPT_BLOCK_SHARED in ../grad_norm_kernels.cu).
template <typename T>
T* block_shared() {
  static_assert(sizeof(T) <= kSharedBytes, "more shared memory than a block has");
  return static_cast<T*>(current.shared);
}

// How blocks run. concurrent: every thread of every block at once (the OS interleaves them);
// serial: one block after another, in an order shuffled by `seed` (0: launch order).
struct Schedule {
  bool concurrent = true;
  uint64_t seed = 0;
};

inline Schedule& schedule() {
  static Schedule s;
  return s;
}

// Persistent worker threads, one per CUDA thread a launch runs at once: starting thousands of OS
// threads per launch would cost more than the kernels. A launch wakes only the workers it uses.
// Workers are never joined (the pool lives until the process exits).
class Pool {
 public:
  // Runs job(0) ... job(n - 1), each on its own thread, all at the same time; returns when all
  // have returned.
  template <typename Job>
  void run(size_t n, const Job& job) {
    std::lock_guard<std::mutex> launch(launch_mu_);  // one launch at a time
    while (workers_.size() < n) {
      workers_.push_back(std::make_unique<Worker>());
      std::thread(&Pool::work, this, workers_.back().get(), workers_.size() - 1).detach();
    }
    job_ = std::cref(job);
    remaining_.store(n);
    for (size_t i = 0; i < n; ++i) workers_[i]->go.release();
    std::unique_lock<std::mutex> lock(done_mu_);
    done_.wait(lock, [&] { return remaining_.load() == 0; });
  }

 private:
  struct Worker {
    std::binary_semaphore go{0};
  };
  void work(Worker* self, size_t index) {
    for (;;) {
      self->go.acquire();
      job_(index);
      if (remaining_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(done_mu_);
        done_.notify_one();
      }
    }
  }
  std::mutex launch_mu_, done_mu_;
  std::condition_variable done_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::function<void(size_t)> job_;
  std::atomic<size_t> remaining_{0};
};

inline Pool& pool() {
  static Pool* p = new Pool();  // leaked on purpose: detached workers use it until exit
  return *p;
}

// Runs kernel(args) over a 1-D grid of 1-D blocks. Returns 0, like cudaGetLastError after a
// good launch; a bad configuration returns cudaErrorInvalidConfiguration.
template <typename Kernel, typename Args>
int launch(Kernel kernel, int grid, int block, const Args& args) {
  if (grid <= 0 || block <= 0 || block > 1024) return static_cast<int>(cudaErrorInvalidConfiguration);
  const Schedule how = schedule();
  // The blocks that run together: all of them, or one at a time in a shuffled order.
  std::vector<int> order(static_cast<size_t>(grid));
  std::iota(order.begin(), order.end(), 0);
  if (!how.concurrent && how.seed != 0) std::shuffle(order.begin(), order.end(), std::mt19937_64(how.seed));
  const size_t together = how.concurrent ? order.size() : 1;
  for (size_t first = 0; first < order.size(); first += together) {
    std::vector<std::unique_ptr<std::barrier<>>> barriers;
    std::vector<std::unique_ptr<std::max_align_t[]>> shared;
    for (size_t k = 0; k < together; ++k) {
      barriers.push_back(std::make_unique<std::barrier<>>(block));
      shared.push_back(std::make_unique<std::max_align_t[]>(kSharedBytes / sizeof(std::max_align_t)));
    }
    pool().run(together * static_cast<size_t>(block), [&](size_t i) {
      const size_t k = i / static_cast<size_t>(block);
      current.thread = uint3{static_cast<unsigned>(i % static_cast<size_t>(block)), 0, 0};
      current.block = uint3{static_cast<unsigned>(order[first + k]), 0, 0};
      current.block_dim = dim3(static_cast<unsigned>(block));
      current.grid_dim = dim3(static_cast<unsigned>(grid));
      current.barrier = barriers[k].get();
      current.shared = shared[k].get();
      kernel(args);
      current.barrier->arrive_and_drop();
    });
  }
  return 0;
}

}  // namespace fusedopt_emulation

// The built-in variables and functions the kernels use, defined after the CUDA headers (which
// declare the built-ins as externs).
#define threadIdx (::fusedopt_emulation::current.thread)
#define blockIdx (::fusedopt_emulation::current.block)
#define blockDim (::fusedopt_emulation::current.block_dim)
#define gridDim (::fusedopt_emulation::current.grid_dim)

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

inline void __syncthreads() { ::fusedopt_emulation::current.barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
