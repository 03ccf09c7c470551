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

// Reverse KL (div = 1) or JSD(beta) (div = 2, 0 < beta < 1; the divergence registry's codes) of
// the rows of the scaled logits s (u_s) and t (u_t): kd[i] per row, in four passes, each row sum
// a sum of per-element terms (no two ~log V sums subtracted). With need_grad, s[i, :] becomes
// a[i] * dD/du_s (rows sum to zero up to rounding) and t is used as scratch (overwritten); without,
// t is read only. Teacher entries of -1e30 or below get probability 0. Threads and ISA as
// kd_forward_kl_rows.
void kd_div_rows(int div, float beta, float* s, std::int64_t lds, float* t, std::int64_t ldt, const float* a,
                 float* kd, std::int64_t rows, std::int64_t V, bool need_grad, int n_threads);

// Any divergence (div = 0 forward KL, 1 reverse KL, 2 JSD) against a top-k teacher: idx [rows, k]
// int64 indices in [0, V), tv [rows, k] the teacher's scaled values, tail [rows] its scaled tail
// logit or nullptr (then the renormalized top-k). Both sides are taken over k + 1 buckets (the k
// entries and the rest; the student's tail is the exact log-sum-exp of its other logits). s is
// overwritten (by exps; with need_grad by a[i] * dD/du_s).
void kd_topk_rows(int div, float beta, float* s, std::int64_t lds, const std::int64_t* idx, const float* tv,
                  std::int64_t k, const float* tail, const float* a, float* kd, std::int64_t rows, std::int64_t V,
                  bool need_grad, int n_threads);

// Softcap of raw logit rows in one pass: x = post * c * tanh(x / c) (entries <= -1e30 stay
// masked); with deriv non-null, deriv[i, :] = 1 - tanh^2 (the factor dL/dz picks up).
void softcap_rows(float* x, std::int64_t ldx, float* deriv, std::int64_t ldd, float c, float post, std::int64_t rows,
                  std::int64_t V, int n_threads);

// Which code path the row kernels take on this CPU: "avx2+fma" or "baseline".
const char* kd_rows_isa();

}  // namespace minitron
