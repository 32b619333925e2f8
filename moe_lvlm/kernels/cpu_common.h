// What the native CPU kernels share: 8-float vector types and their helpers, a vectorised exp,
// a parallel-for over XLA's intra-op thread pool and a per-thread scratch buffer.
// Included by attention.cc and moe.cc (build.py keys their libraries by this file too).

#ifndef MOE_LVLM_KERNELS_CPU_COMMON_H_
#define MOE_LVLM_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace moe_lvlm {

namespace ffi = xla::ffi;

// 8 floats / ints (one AVX register; g++ splits them where the target has narrower vectors).
typedef float V __attribute__((vector_size(32)));
typedef int32_t Vi __attribute__((vector_size(32)));
typedef float Vu __attribute__((vector_size(32), aligned(4)));
typedef int32_t Viu __attribute__((vector_size(32), aligned(4)));
constexpr int kW = 8;

inline V Load(const float* p) { return *reinterpret_cast<const Vu*>(p); }
inline Vi LoadI(const int32_t* p) { return *reinterpret_cast<const Viu*>(p); }
inline void Store(float* p, V x) { *reinterpret_cast<Vu*>(p) = x; }
inline V Splat(float x) { return V{x, x, x, x, x, x, x, x}; }
inline float Sum(V x) {
  float s = 0.0f;
  for (int i = 0; i < kW; ++i) s += x[i];
  return s;
}
inline float Max(V x) {
  float m = x[0];
  for (int i = 1; i < kW; ++i) m = std::max(m, x[i]);
  return m;
}

// exp(x): 0 below -87, clamped at exp(88).
inline V Exp(V x) {
  const V xc = x < -87.0f ? Splat(-87.0f) : (x > 88.0f ? Splat(88.0f) : x);
  const V magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V shifted = xc * 1.44269504f + magic;
  const V n = shifted - magic;
  const V g = xc - n * 6.93145752e-1f - n * 1.42860677e-6f;
  V p = Splat(1.0f / 720.0f);
  p = p * g + 1.0f / 120.0f;
  p = p * g + 1.0f / 24.0f;
  p = p * g + 1.0f / 6.0f;
  p = p * g + 0.5f;
  p = p * g + 1.0f;
  p = p * g + 1.0f;
  // A vector cast reinterprets the bits: the integer n sits in the low bits of `shifted`.
  const Vi bits = (((Vi)shifted - (Vi)magic) + 127) << 23;
  const V r = p * (V)bits;
  return x < -87.0f ? V{} : r;
}

// Runs fn(0 .. n-1) on the caller and up to num_threads - 1 pool threads. The caller waits for
// the work items, not for the scheduled closures: a closure that starts late finds no work left.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t n,
                        const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    std::function<void(int64_t)> fn;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = fn;
  auto work = [](State& s) {
    for (int64_t i = s.next.fetch_add(1); i < s.n; i = s.next.fetch_add(1)) {
      s.fn(i);
      if (s.done.fetch_add(1) + 1 == s.n) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, work] { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// A per-thread scratch buffer of at least n floats (contents undefined), reused across calls:
// heap, not stack (XLA's pool threads need not have large stacks), and no allocation per task.
inline float* Scratch(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace moe_lvlm

#endif  // MOE_LVLM_KERNELS_CPU_COMMON_H_
