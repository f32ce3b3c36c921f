// Work split into numbered tasks, run by the calling thread and XLA's intra-op threads (the FFI's
// ThreadPool context), shared by the native CPU kernels (cpu_decode.cc, cpu_matmul.cc, cpu_blocks.cc).
//
// run_tasks(pool, total, make_worker): make_worker() is called once by each thread that takes a task and
// returns that thread's worker, called as worker(task) for each task it takes (per-thread scratch lives in
// the worker). Returns once every task is done. A pool thread that starts after the call has returned
// finds nothing left, never calls make_worker, and touches only the counters it shares.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace xlserve {

constexpr std::chrono::microseconds kCallerYield{50};

// As run_tasks, with `prologue()` run by the caller first (work every task reads, such as repacked inputs):
// the helpers are woken before it, and wait for it to finish before taking a task, so their wake-up (several
// microseconds on a VM) overlaps it.
template <typename MakeWorker, typename Prologue>
void run_tasks_after(xla::ffi::ThreadPool& pool, int64_t total, MakeWorker make_worker, Prologue prologue) {
  struct Counters {
    std::atomic<int64_t> next{0}, finished{0};
    std::atomic<bool> started{false};
    std::mutex mutex;
    std::condition_variable all_finished;
  };
  auto counters = std::make_shared<Counters>();
  // Takes tasks until none is left; the thread that finishes the last one wakes the caller.
  auto drain = [counters, total, make_worker] {
    while (!counters->started.load(std::memory_order_acquire)) std::this_thread::yield();
    int64_t task = counters->next.fetch_add(1);
    if (task >= total) return;
    auto worker = make_worker();
    for (; task < total; task = counters->next.fetch_add(1)) {
      worker(task);
      if (counters->finished.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(counters->mutex);
        counters->all_finished.notify_all();
      }
    }
  };
  // The caller works too, so one helper fewer than the pool's threads (which number the cores): with one
  // helper per pool thread, three threads shared two cores, and a helper descheduled in the middle of its
  // task held up the whole call (SmolLM2-135M's 16-row decode step: 64 -> 42 ms in native calls). None where
  // there is a single task.
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, total - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([drain] { drain(); });  // a copy: Schedule takes an rvalue
  prologue();
  counters->started.store(true, std::memory_order_release);
  drain();
  // The helpers' last tasks end within microseconds: waiting for them on the condition variable put the caller to
  // sleep, and a sleeping vCPU took ~10 us to wake (a 16-row step's chain of products 27.0 -> 25.7 ms, one row
  // 8.35 -> 7.62: docs/perf-notes.md, "Twenty-first session"). So it yields first, for at most kCallerYield.
  const auto since = std::chrono::steady_clock::now();
  while (counters->finished.load(std::memory_order_acquire) != total &&
         std::chrono::steady_clock::now() - since < kCallerYield)
    std::this_thread::yield();
  std::unique_lock<std::mutex> lock(counters->mutex);
  counters->all_finished.wait(lock, [&] { return counters->finished.load() == total; });
}

template <typename MakeWorker>
void run_tasks(xla::ffi::ThreadPool& pool, int64_t total, MakeWorker make_worker) {
  run_tasks_after(pool, total, make_worker, [] {});
}

}  // namespace xlserve
