#include "kd_rows.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include "parallel.h"

namespace minitron {
namespace {

constexpr std::int64_t kBlock = 1024;  // fp32 partial sums per block, fp64 across blocks

// exp(x) for x <= 0 in plain arithmetic the compiler vectorizes: x = n ln2 + r with n = round(x
// log2 e) (magic-number rounding), a degree-6 polynomial for e^r on |r| <= ln2 / 2 (Cephes'
// expf coefficients, ~1 ulp), and 2^n from the exponent bits. Below -87 (2^n would be
// subnormal) the result is exactly 0, so masked logits contribute nothing.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float xc = x < -87.0f ? -87.0f : x;
  const float k = xc * 1.44269504088896341f + magic;
  const float n = k - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t e = (__builtin_bit_cast(std::int32_t, k) - 0x4B400000 + 127) << 23;  // n + bias: exponent
  const float keep = x >= -87.0f ? 1.0f : 0.0f;
  return p * __builtin_bit_cast(float, e) * keep;
}

template <bool Grad>
__attribute__((always_inline)) inline float row_kernel(float* __restrict s, float* __restrict t, float a,
                                                       std::int64_t V) {
  float ms = -std::numeric_limits<float>::infinity(), mt = ms;
#pragma omp simd reduction(max : ms, mt)
  for (std::int64_t v = 0; v < V; ++v) {
    ms = s[v] > ms ? s[v] : ms;
    mt = t[v] > mt ? t[v] : mt;
  }
  double Ss = 0.0, St = 0.0, A = 0.0;
  for (std::int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const std::int64_t b1 = b0 + kBlock < V ? b0 + kBlock : V;
    float ss = 0.0f, st = 0.0f, aa = 0.0f;
#pragma omp simd reduction(+ : ss, st, aa)
    for (std::int64_t v = b0; v < b1; ++v) {
      const float xs = s[v] - ms, xt = t[v] - mt;
      const float es = exp_nonpos(xs), et = exp_nonpos(xt);
      ss += es;
      st += et;
      aa += et * (xt - xs);  // p_t log(p_t / p_s) before normalization (masked: 0 * finite = 0)
      if (Grad) {
        s[v] = es;
        t[v] = et;
      }
    }
    Ss += ss;
    St += st;
    A += aa;
  }
  // kd = <p_t, log p_t - log p_s> = A / St - log St + log Ss
  const float kd = static_cast<float>(A / St - std::log(St) + std::log(Ss));
  if (Grad) {
    const float cs = static_cast<float>(a / Ss), ct = static_cast<float>(a / St);
#pragma omp simd
    for (std::int64_t v = 0; v < V; ++v) s[v] = s[v] * cs - t[v] * ct;
  }
  return kd;
}

template <bool Grad>
__attribute__((always_inline)) inline float ce_kernel(const float* z, float* g, std::int64_t label, float a,
                                                      std::int64_t V) {
  const float zl = z[label];  // read first: with g == z the passes below overwrite it
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (std::int64_t v = 0; v < V; ++v) m = z[v] > m ? z[v] : m;
  double S = 0.0;
  for (std::int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const std::int64_t b1 = b0 + kBlock < V ? b0 + kBlock : V;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (std::int64_t v = b0; v < b1; ++v) {
      const float e = exp_nonpos(z[v] - m);
      ss += e;
      if (Grad) g[v] = e;
    }
    S += ss;
  }
  const float ce = static_cast<float>(static_cast<double>(m) + std::log(S) - static_cast<double>(zl));
  if (Grad) {
    const float c = static_cast<float>(a / S);
#pragma omp simd
    for (std::int64_t v = 0; v < V; ++v) g[v] *= c;
    g[label] -= a;
  }
  return ce;
}

// Two compilations of the same loop: AVX2+FMA (8 lanes, fused multiply-adds) and the x86-64
// baseline (SSE2), chosen at run time. The always_inline body is compiled for each caller's ISA.
template <bool Grad>
__attribute__((target("avx2,fma"))) void rows_avx2(float* s, std::int64_t lds, float* t, std::int64_t ldt,
                                                   const float* a, float* kd, std::int64_t lo, std::int64_t hi,
                                                   std::int64_t V) {
  for (std::int64_t i = lo; i < hi; ++i) kd[i] = row_kernel<Grad>(s + i * lds, t + i * ldt, a ? a[i] : 0.0f, V);
}

template <bool Grad>
void rows_base(float* s, std::int64_t lds, float* t, std::int64_t ldt, const float* a, float* kd, std::int64_t lo,
               std::int64_t hi, std::int64_t V) {
  for (std::int64_t i = lo; i < hi; ++i) kd[i] = row_kernel<Grad>(s + i * lds, t + i * ldt, a ? a[i] : 0.0f, V);
}

template <bool Grad>
__attribute__((target("avx2,fma"))) void ce_avx2(const float* z, std::int64_t ldz, float* g, std::int64_t ldg,
                                                 const std::int64_t* label, const float* a, float* ce,
                                                 std::int64_t lo, std::int64_t hi, std::int64_t V) {
  for (std::int64_t i = lo; i < hi; ++i) ce[i] = ce_kernel<Grad>(z + i * ldz, g + i * ldg, label[i], a ? a[i] : 0.0f, V);
}

template <bool Grad>
void ce_base(const float* z, std::int64_t ldz, float* g, std::int64_t ldg, const std::int64_t* label, const float* a,
             float* ce, std::int64_t lo, std::int64_t hi, std::int64_t V) {
  for (std::int64_t i = lo; i < hi; ++i) ce[i] = ce_kernel<Grad>(z + i * ldz, g + i * ldg, label[i], a ? a[i] : 0.0f, V);
}

int row_threads(int n_threads, std::int64_t rows, std::int64_t V) {
  // at least ~64k entries per thread, or the thread start costs more than it saves
  const std::int64_t by_size = (rows * V) / (std::int64_t(1) << 16);
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(hardware_threads(n_threads), by_size)));
}

bool has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace

const char* kd_rows_isa() { return has_avx2_fma() ? "avx2+fma" : "baseline"; }

void kd_forward_kl_rows(float* s, std::int64_t lds, float* t, std::int64_t ldt, const float* a, float* kd,
                        std::int64_t rows, std::int64_t V, bool need_grad, int n_threads) {
  if (rows <= 0 || V <= 0) return;
  const int T = row_threads(n_threads, rows, V);
  const bool avx2 = has_avx2_fma();
  parallel_blocks(T, 0, rows, [&](int, std::int64_t lo, std::int64_t hi) {
    if (avx2) {
      need_grad ? rows_avx2<true>(s, lds, t, ldt, a, kd, lo, hi, V) : rows_avx2<false>(s, lds, t, ldt, a, kd, lo, hi, V);
    } else {
      need_grad ? rows_base<true>(s, lds, t, ldt, a, kd, lo, hi, V) : rows_base<false>(s, lds, t, ldt, a, kd, lo, hi, V);
    }
  });
}

void ce_rows(const float* z, std::int64_t ldz, float* g, std::int64_t ldg, const std::int64_t* label,
             const float* a, float* ce, std::int64_t rows, std::int64_t V, bool need_grad, int n_threads) {
  if (rows <= 0 || V <= 0) return;
  const int T = row_threads(n_threads, rows, V);
  const bool avx2 = has_avx2_fma();
  parallel_blocks(T, 0, rows, [&](int, std::int64_t lo, std::int64_t hi) {
    if (avx2) {
      need_grad ? ce_avx2<true>(z, ldz, g, ldg, label, a, ce, lo, hi, V) : ce_avx2<false>(z, ldz, g, ldg, label, a, ce, lo, hi, V);
    } else {
      need_grad ? ce_base<true>(z, ldz, g, ldg, label, a, ce, lo, hi, V) : ce_base<false>(z, ldz, g, ldg, label, a, ce, lo, hi, V);
    }
  });
}

}  // namespace minitron
