// A fork-join parallel loop on std::thread, shared by the host kernels.
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace minitron {

// Runs fn(t, lo, hi) on T threads over [a, b) split into contiguous blocks (the caller's
// thread takes the first block).
template <class Fn>
void parallel_blocks(int T, std::int64_t a, std::int64_t b, Fn&& fn) {
  const std::int64_t n = b - a;
  if (T <= 1 || n <= 1) {
    fn(0, a, b);
    return;
  }
  T = static_cast<int>(std::min<std::int64_t>(T, n));
  const std::int64_t per = (n + T - 1) / T;
  std::vector<std::thread> pool;
  pool.reserve(T - 1);
  for (int t = 1; t < T; ++t) {
    const std::int64_t lo = a + t * per, hi = std::min(b, lo + per);
    if (lo >= hi) break;
    pool.emplace_back([&fn, t, lo, hi] { fn(t, lo, hi); });
  }
  fn(0, a, std::min(b, a + per));
  for (auto& th : pool) th.join();
}

// n_threads <= 0 means one per hardware thread.
inline int hardware_threads(int n_threads) {
  return n_threads > 0 ? n_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace minitron
