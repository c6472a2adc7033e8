// What the CPU handlers share: IEEE subnormal arithmetic, a parallel loop on XLA's intra-op pool, and
// reading a stored block scale.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "kbit_format.h"
#include "xla/ffi/api/ffi.h"

namespace kbit {

namespace ffi = xla::ffi;

// XLA's CPU runtime may run handlers with denormals flushed (FTZ/DAZ set in
// MXCSR); format v1 is defined with IEEE subnormals, so each piece of work runs
// with them switched back on and restores the caller's mode.
class IeeeSubnormals {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  IeeeSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~(kFtz | kDaz)); }
  ~IeeeSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_;
#elif defined(__aarch64__)
  IeeeSubnormals() {
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t cleared = saved_ & ~(uint64_t{1} << 24);  // FZ
    __asm__ __volatile__("msr fpcr, %0" : : "r"(cleared));
  }
  ~IeeeSubnormals() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_)); }

 private:
  uint64_t saved_;
#endif
};

// Runs fn(begin, end) over [0, total) in chunks on the pool and the calling
// thread. The caller works too and only waits for chunks that a pool thread has
// already claimed, so a busy or single-thread pool cannot deadlock; tasks that
// start late find nothing left and return.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t total, int64_t grain, const Fn& fn) {
  if (total <= 0) return;
  const int64_t chunks = (total + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (threads <= 0) {
    IeeeSubnormals ieee;
    fn(0, total);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  // `fn` lives on the caller's stack; tasks touch it only for chunks they
  // claimed before `done` completes.
  const Fn* f = &fn;
  auto work = [state, f, total, grain, chunks]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      {
        IeeeSubnormals ieee;
        (*f)(c* grain, std::min(total, (c + 1) * grain));
      }
      if (state->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t i = 0; i < threads; ++i) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == chunks; });
}

inline uint32_t read_scale(const void* scales, int64_t i, ScaleFormat fmt) {
  if (fmt == ScaleFormat::kE4M4) return static_cast<const uint8_t*>(scales)[i];
  if (fmt == ScaleFormat::kF16) return static_cast<const uint16_t*>(scales)[i];
  return static_cast<const uint32_t*>(scales)[i];
}

}  // namespace kbit
