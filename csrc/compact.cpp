#include "compact.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
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

std::size_t compact_rows(std::uint8_t* base, std::int64_t n_rows, std::size_t row_bytes,
                         const std::int64_t* kept, std::int64_t n_kept) {
  check_indices(kept, n_kept, n_rows, "row");
  // Destination row i <= source row kept[i], so a forward sweep never overwrites a source row
  // it still needs. Runs of consecutive kept rows move with one memmove each.
  std::int64_t i = 0;
  while (i < n_kept) {
    std::int64_t j = i + 1;
    while (j < n_kept && kept[j] == kept[j - 1] + 1) ++j;
    if (kept[i] != i) {
      std::memmove(base + static_cast<std::size_t>(i) * row_bytes,
                   base + static_cast<std::size_t>(kept[i]) * row_bytes,
                   static_cast<std::size_t>(j - i) * row_bytes);
    }
    i = j;
  }
  return static_cast<std::size_t>(n_kept) * row_bytes;
}

namespace {

// Gathers the kept columns of rows [r0, r1) into dst (a [r1 - r0, n_kept] block).
void gather_cols(const std::uint8_t* base, std::int64_t r0, std::int64_t r1, std::int64_t n_cols,
                 std::size_t elem_size, const std::int64_t* kept, std::int64_t n_kept,
                 std::uint8_t* dst) {
  const std::size_t src_row = static_cast<std::size_t>(n_cols) * elem_size;
  const std::size_t dst_row = static_cast<std::size_t>(n_kept) * elem_size;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* s = base + static_cast<std::size_t>(r) * src_row;
    std::uint8_t* d = dst + static_cast<std::size_t>(r - r0) * dst_row;
    std::int64_t c = 0;
    while (c < n_kept) {  // copy runs of consecutive kept columns at once
      std::int64_t e = c + 1;
      while (e < n_kept && kept[e] == kept[e - 1] + 1) ++e;
      std::memmove(d + static_cast<std::size_t>(c) * elem_size,
                   s + static_cast<std::size_t>(kept[c]) * elem_size,
                   static_cast<std::size_t>(e - c) * elem_size);
      c = e;
    }
  }
}

}  // namespace

std::size_t compact_cols(std::uint8_t* base, std::int64_t n_rows, std::int64_t n_cols,
                         std::size_t elem_size, const std::int64_t* kept, std::int64_t n_kept,
                         int n_threads) {
  check_indices(kept, n_kept, n_cols, "column");
  const std::size_t dst_row = static_cast<std::size_t>(n_kept) * elem_size;
  if (n_rows == 0 || n_kept == 0) return 0;
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // The destination of row r, [r * n_kept, (r + 1) * n_kept), only overlaps source rows <= r.
  // So rows may be processed in rounds: every thread gathers its block of the round into a
  // private staging buffer (reads only), then all copy their staging out (writes only). Writes
  // of a round clobber only source rows of that round or earlier ones, all already read.
  constexpr std::size_t kStageBytes = std::size_t(4) << 20;  // per thread, L2/L3-friendly
  const std::int64_t rows_per_block =
      std::max<std::int64_t>(1, static_cast<std::int64_t>(kStageBytes / std::max<std::size_t>(dst_row, 1)));
  if (n_threads == 1 || n_rows <= rows_per_block) {
    // One thread: a forward sweep is already safe, and needs no staging.
    gather_cols(base, 0, n_rows, n_cols, elem_size, kept, n_kept, base);
    return static_cast<std::size_t>(n_rows) * dst_row;
  }
  std::vector<std::vector<std::uint8_t>> stage(n_threads,
                                               std::vector<std::uint8_t>(rows_per_block * dst_row));
  const std::int64_t round_rows = rows_per_block * n_threads;
  for (std::int64_t r0 = 0; r0 < n_rows; r0 += round_rows) {
    auto phase = [&](bool write) {
      std::vector<std::thread> pool;
      for (int t = 0; t < n_threads; ++t) {
        const std::int64_t a = r0 + t * rows_per_block;
        const std::int64_t b = std::min(n_rows, a + rows_per_block);
        if (a >= b) break;
        pool.emplace_back([&, t, a, b] {
          if (!write) {
            gather_cols(base, a, b, n_cols, elem_size, kept, n_kept, stage[t].data());
          } else {
            std::memcpy(base + static_cast<std::size_t>(a) * dst_row, stage[t].data(),
                        static_cast<std::size_t>(b - a) * dst_row);
          }
        });
      }
      for (auto& th : pool) th.join();
    };
    phase(false);
    phase(true);
  }
  return static_cast<std::size_t>(n_rows) * dst_row;
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
