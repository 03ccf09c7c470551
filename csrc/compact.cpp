#include "compact.h"

#include "parallel.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace minitron {

void check_indices(const std::int64_t* kept, std::int64_t n_kept, std::int64_t limit,
                   const char* what) {
  for (std::int64_t i = 0; i < n_kept; ++i) {
    if (kept[i] < 0 || kept[i] >= limit) {
      throw std::invalid_argument(std::string(what) + " index " + std::to_string(kept[i]) +
                                  " is out of range [0, " + std::to_string(limit) + ")");
    }
    if (i > 0 && kept[i] <= kept[i - 1]) {
      throw std::invalid_argument(std::string(what) +
                                  " indices must be strictly increasing (sorted, unique); got " +
                                  std::to_string(kept[i - 1]) + " then " +
                                  std::to_string(kept[i]));
    }
  }
}

namespace {

constexpr std::size_t kStageBytes = std::size_t(4) << 20;     // staging per thread (cache-sized)
constexpr std::size_t kMinDirectBytes = std::size_t(1) << 20;  // smallest round worth threads
constexpr std::size_t kMinThreadBytes = std::size_t(1) << 20;  // smallest share of one thread

// Staging buffers persist across calls: a fresh 4 MiB block per call would be fresh pages,
// and page faults on fresh memory are what makes naive slicing slow in the first place.
std::mutex g_stage_mutex;
std::vector<std::vector<std::uint8_t>> g_stage;

int resolve_threads(int n_threads, std::size_t total_bytes) {
  n_threads = hardware_threads(n_threads);
  const std::size_t by_size = std::max<std::size_t>(1, total_bytes / kMinThreadBytes);
  return static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(n_threads), by_size));
}

// The in-place schedule shared by row and column compaction. Units are output rows
// u in [first, n); unit u lands at base + u * unit_bytes. safe(a) is how many units starting
// at a can be written without touching any byte that units >= a still have to read: rounds of
// that many run on all threads straight into place. Where that is too small (at the start of
// the buffer), a round gathers into per-thread staging buffers first (all reads), joins, then
// copies out (all writes). Writes never reach sources of later rounds, which lie further on.
template <class Safe, class Gather>
void run_rounds(std::uint8_t* base, std::int64_t first, std::int64_t n, std::size_t unit_bytes, int T,
                Safe&& safe, Gather&& gather) {
  if (first >= n) return;
  if (T <= 1) {  // one thread: a forward sweep is already safe
    gather(first, n, base + static_cast<std::size_t>(first) * unit_bytes);
    return;
  }
  const std::int64_t stage_units =
      std::max<std::int64_t>(1, static_cast<std::int64_t>(kStageBytes / std::max<std::size_t>(unit_bytes, 1)));
  std::unique_lock<std::mutex> lock(g_stage_mutex, std::defer_lock);
  std::vector<std::vector<std::uint8_t>>& stage = g_stage;
  std::int64_t a = first;
  while (a < n) {
    const std::int64_t s = std::min<std::int64_t>(safe(a), n - a);
    if (s >= 1 && (static_cast<std::size_t>(s) * unit_bytes >= kMinDirectBytes || a + s >= n)) {
      const std::int64_t b = a + s;
      parallel_blocks(T, a, b, [&](int, std::int64_t lo, std::int64_t hi) {
        gather(lo, hi, base + static_cast<std::size_t>(lo) * unit_bytes);
      });
      a = b;
      continue;
    }
    if (!lock.owns_lock()) {
      lock.lock();
      if (stage.size() < static_cast<std::size_t>(T)) stage.resize(T);
      for (int t = 0; t < T; ++t) {
        if (stage[t].size() < stage_units * unit_bytes) stage[t].resize(stage_units * unit_bytes);
      }
    }
    const std::int64_t b = std::min(n, a + stage_units * T);
    const std::int64_t per = std::min<std::int64_t>(stage_units, (b - a + T - 1) / T);
    auto block = [&](int t, bool write) {
      const std::int64_t lo = a + t * per, hi = std::min(b, lo + per);
      if (lo >= hi) return;
      if (!write) {
        gather(lo, hi, stage[t].data());
      } else {
        std::memcpy(base + static_cast<std::size_t>(lo) * unit_bytes, stage[t].data(),
                    static_cast<std::size_t>(hi - lo) * unit_bytes);
      }
    };
    for (bool write : {false, true}) {
      std::vector<std::thread> pool;
      for (int t = 1; t < T; ++t) pool.emplace_back([&, t] { block(t, write); });
      block(0, write);
      for (auto& th : pool) th.join();
    }
    a = b;
  }
}

}  // namespace

namespace {

// Copies n elements of elem_size bytes from s to d (d <= s when they overlap): long runs with
// memmove, short ones (random channel selections keep runs of a few elements) with a typed
// forward loop, which costs far less than a libc call per run.
inline void copy_run(std::uint8_t* d, const std::uint8_t* s, std::size_t n, std::size_t elem_size) {
  const std::size_t bytes = n * elem_size;
  if (bytes >= 64) {
    std::memmove(d, s, bytes);
    return;
  }
  switch (elem_size) {
    case 4: {
      auto* dd = reinterpret_cast<std::uint32_t*>(d);
      auto* ss = reinterpret_cast<const std::uint32_t*>(s);
      for (std::size_t i = 0; i < n; ++i) dd[i] = ss[i];
      return;
    }
    case 2: {
      auto* dd = reinterpret_cast<std::uint16_t*>(d);
      auto* ss = reinterpret_cast<const std::uint16_t*>(s);
      for (std::size_t i = 0; i < n; ++i) dd[i] = ss[i];
      return;
    }
    case 1:
      for (std::size_t i = 0; i < n; ++i) d[i] = s[i];
      return;
    default:
      std::memmove(d, s, bytes);
  }
}

template <class E>
inline void gather_index(E* d, const E* s, const std::int64_t* idx, std::int64_t n) {
  for (std::int64_t j = 0; j < n; ++j) d[j] = s[idx[j]];
}

}  // namespace

std::size_t compact_2d(std::uint8_t* base, std::int64_t n_rows, std::int64_t n_cols, std::size_t elem_size,
                       const std::int64_t* rows, std::int64_t n_kept_rows, const std::int64_t* cols,
                       std::int64_t n_kept_cols, int n_threads) {
  if (rows) check_indices(rows, n_kept_rows, n_rows, "row");
  if (cols) check_indices(cols, n_kept_cols, n_cols, "column");
  const std::int64_t K = rows ? n_kept_rows : n_rows;
  const std::int64_t KC = cols ? n_kept_cols : n_cols;
  const std::size_t src_row = static_cast<std::size_t>(n_cols) * elem_size;
  const std::size_t dst_row = static_cast<std::size_t>(KC) * elem_size;
  if (K == 0 || KC == 0) return 0;
  const bool all_cols = KC == n_cols;  // strictly increasing and KC == n_cols: the identity
  auto row_of = [&](std::int64_t i) -> std::int64_t { return rows ? rows[i] : i; };
  // Output row i lands at i * dst_row; its source starts at row_of(i) * src_row. Rows whose
  // bytes do not move are skipped (a prefix of kept rows when all columns are kept).
  std::int64_t first = 0;
  if (all_cols) {
    while (first < K && row_of(first) == first) ++first;
  }
  std::vector<std::pair<std::int64_t, std::int64_t>> runs;  // (first kept column, length)
  if (!all_cols) {
    for (std::int64_t c = 0; c < KC;) {
      std::int64_t e = c + 1;
      while (e < KC && cols[e] == cols[e - 1] + 1) ++e;
      runs.emplace_back(cols[c], e - c);
      c = e;
    }
  }
  // Average run under 8 elements: an index gather beats a copy per run (element sizes 1, 2, 4
  // and 8 have typed loops; others always go by runs).
  const bool by_index = !all_cols && runs.size() * 8 > static_cast<std::size_t>(KC) &&
                        (elem_size == 1 || elem_size == 2 || elem_size == 4 || elem_size == 8);
  const int T = resolve_threads(n_threads, static_cast<std::size_t>(K - first) * dst_row);
  auto gather = [&](std::int64_t lo, std::int64_t hi, std::uint8_t* dst) {
    if (all_cols) {
      std::int64_t i = lo;
      while (i < hi) {  // runs of consecutive kept rows move with one memmove
        std::int64_t j = i + 1;
        while (j < hi && row_of(j) == row_of(j - 1) + 1) ++j;
        std::memmove(dst + static_cast<std::size_t>(i - lo) * dst_row,
                     base + static_cast<std::size_t>(row_of(i)) * src_row,
                     static_cast<std::size_t>(j - i) * dst_row);
        i = j;
      }
      return;
    }
    if (by_index) {  // short runs: one typed gather loop per row (forward order is overlap-safe)
      for (std::int64_t i = lo; i < hi; ++i) {
        const std::uint8_t* s = base + static_cast<std::size_t>(row_of(i)) * src_row;
        std::uint8_t* d = dst + static_cast<std::size_t>(i - lo) * dst_row;
        switch (elem_size) {
          case 4: gather_index(reinterpret_cast<std::uint32_t*>(d), reinterpret_cast<const std::uint32_t*>(s), cols, KC); break;
          case 2: gather_index(reinterpret_cast<std::uint16_t*>(d), reinterpret_cast<const std::uint16_t*>(s), cols, KC); break;
          case 1: gather_index(d, s, cols, KC); break;
          default: gather_index(reinterpret_cast<std::uint64_t*>(d), reinterpret_cast<const std::uint64_t*>(s), cols, KC);
        }
      }
      return;
    }
    for (std::int64_t i = lo; i < hi; ++i) {
      const std::uint8_t* s = base + static_cast<std::size_t>(row_of(i)) * src_row;
      std::uint8_t* d = dst + static_cast<std::size_t>(i - lo) * dst_row;
      for (const auto& run : runs) {
        copy_run(d, s + static_cast<std::size_t>(run.first) * elem_size, static_cast<std::size_t>(run.second),
                 elem_size);
        d += static_cast<std::size_t>(run.second) * elem_size;
      }
    }
  };
  // Output rows [a, a + s) end at (a + s) * dst_row <= row_of(a) * src_row, where the first
  // byte any row >= a reads lies: they can be written straight into place.
  auto safe = [&](std::int64_t a) {
    return static_cast<std::int64_t>((static_cast<std::size_t>(row_of(a)) * src_row) / dst_row) - a;
  };
  run_rounds(base, first, K, dst_row, T, safe, gather);
  return static_cast<std::size_t>(K) * dst_row;
}

std::size_t compact_rows(std::uint8_t* base, std::int64_t n_rows, std::size_t row_bytes,
                         const std::int64_t* kept, std::int64_t n_kept, int n_threads) {
  return compact_2d(base, n_rows, 1, row_bytes, kept, n_kept, nullptr, 0, n_threads);
}

std::size_t compact_cols(std::uint8_t* base, std::int64_t n_rows, std::int64_t n_cols,
                         std::size_t elem_size, const std::int64_t* kept, std::int64_t n_kept,
                         int n_threads) {
  return compact_2d(base, n_rows, n_cols, elem_size, nullptr, 0, kept, n_kept, n_threads);
}

std::size_t release_tail(std::uint8_t* base, std::size_t used_bytes, std::size_t total_bytes) {
  if (used_bytes >= total_bytes) return 0;
  const std::uintptr_t page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  const std::uintptr_t lo = (reinterpret_cast<std::uintptr_t>(base) + used_bytes + page - 1) & ~(page - 1);
  const std::uintptr_t hi = (reinterpret_cast<std::uintptr_t>(base) + total_bytes) & ~(page - 1);
  if (hi <= lo) return 0;
  if (madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED) != 0) return 0;
  return hi - lo;
}

}  // namespace minitron
