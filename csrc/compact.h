// In-place compaction of host buffers: keep a sorted subset of rows or columns of a
// contiguous row-major 2-D buffer, moving the kept data to the front of the same buffer.
// Knows nothing of torch: a base address, a shape, an element size and kept indices.
#pragma once
#include <cstddef>
#include <cstdint>

namespace minitron {

// Keeps rows kept[0..n_kept) (strictly increasing) of a [n_rows, row_bytes] buffer.
// Returns the number of bytes now in use (n_kept * row_bytes). Uses up to n_threads threads
// (0 = hardware concurrency); any dtype (the buffer is bytes).
std::size_t compact_rows(std::uint8_t* base, std::int64_t n_rows, std::size_t row_bytes,
                         const std::int64_t* kept, std::int64_t n_kept, int n_threads = 0);

// Keeps columns kept[0..n_kept) (strictly increasing) of a [n_rows, n_cols] buffer of
// elem_size-byte elements; the result is a contiguous [n_rows, n_kept] buffer at base.
// Uses up to n_threads threads (0 = hardware concurrency).
std::size_t compact_cols(std::uint8_t* base, std::int64_t n_rows, std::int64_t n_cols,
                         std::size_t elem_size, const std::int64_t* kept, std::int64_t n_kept,
                         int n_threads);

// Keeps rows[0..n_kept_rows) and columns cols[0..n_kept_cols) (each strictly increasing; a null
// pointer keeps all) of a [n_rows, n_cols] buffer of elem_size-byte elements in one pass; the
// result is a contiguous [rows, cols] buffer at base. Returns the bytes in use.
std::size_t compact_2d(std::uint8_t* base, std::int64_t n_rows, std::int64_t n_cols, std::size_t elem_size,
                       const std::int64_t* rows, std::int64_t n_kept_rows, const std::int64_t* cols,
                       std::int64_t n_kept_cols, int n_threads = 0);

// Returns the whole pages inside [base + used_bytes, base + total_bytes) to the OS
// (madvise MADV_DONTNEED). The range stays mapped and reads as zeros. Returns bytes released.
std::size_t release_tail(std::uint8_t* base, std::size_t used_bytes, std::size_t total_bytes);

// Throws std::invalid_argument unless kept is strictly increasing within [0, limit).
void check_indices(const std::int64_t* kept, std::int64_t n_kept, std::int64_t limit,
                   const char* what);

}  // namespace minitron
