// Fused softmax / forward-KL rows for the CPU path of the fused KD loss.
// Knows nothing of torch: fp32 row-major buffers, a leading dimension, and counts.
#pragma once
#include <cstdint>

namespace minitron {

// For each row i of the student's scaled logits s (u_s = z_s / T) and the teacher's t (u_t):
//   kd[i] = KL(p_t || p_s) = sum_v p_t (log p_t - log p_s),  p = softmax(u) over V entries,
// in three passes over the row (max; exp and sums; gradient) instead of the ~20 of the torch
// path. With need_grad, s[i, :] is overwritten by a[i] * (p_s - p_t), i.e. dL/du_s scaled by
// the per-row factor a[i], and t[i, :] by exp(u_t - max); without it both are left as read.
// Row sums accumulate in fp32 lanes per 1024-entry block and in fp64 across blocks.
// Teacher entries of -1e30 or below (masked) get probability exactly 0. Uses up to n_threads
// threads (0 = one per hardware thread) over rows; AVX2+FMA code when the CPU has it.
void kd_forward_kl_rows(float* s, std::int64_t lds, float* t, std::int64_t ldt, const float* a, float* kd,
                        std::int64_t rows, std::int64_t V, bool need_grad, int n_threads);

// Cross-entropy rows: ce[i] = logsumexp(z[i, :]) - z[i, label[i]] for the raw logits z. With
// need_grad, g[i, :] = a[i] * (softmax(z[i, :]) - onehot(label[i])) (g may be z itself: in
// place). Three passes per row; labels must lie in [0, V) (the caller maps ignored rows to a
// valid label with a[i] = 0). Threads and ISA as kd_forward_kl_rows.
void ce_rows(const float* z, std::int64_t ldz, float* g, std::int64_t ldg, const std::int64_t* label,
             const float* a, float* ce, std::int64_t rows, std::int64_t V, bool need_grad, int n_threads);

// Which code path the row kernels take on this CPU: "avx2+fma" or "baseline".
const char* kd_rows_isa();

}  // namespace minitron
