#include "kd_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

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

// e^x and e^x - 1 for x <= 0 (below -87: exactly 0 and -1), with exp_nonpos's range reduction
// x = n ln2 + r. e^r - 1 = r + r^2 P(r) is accurate relative to itself, so where n = 0
// (|x| < ln2 / 2) em1 keeps the digits of a small x that e - 1 would round away (its error is
// 2^-24 absolute, i.e. 2^-24 / |x| relative); where n != 0, e <= 0.71 and e - 1 loses nothing.
__attribute__((always_inline)) inline float exp_em1_nonpos(float x, float& em1) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
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
  const float er1 = p * r * r + r;  // e^r - 1
  const std::int32_t e = (__builtin_bit_cast(std::int32_t, k) - 0x4B400000 + 127) << 23;
  const float keep = x >= -87.0f ? 1.0f : 0.0f;
  const float ex = (er1 + 1.0f) * __builtin_bit_cast(float, e) * keep;
  em1 = n == 0.0f ? er1 : ex - 1.0f;
  return ex;
}

// log(1 + w) for -1 < w <= 0 in plain arithmetic the compiler vectorizes, accurate relative to
// itself (~2 ulp): Cephes' logf polynomial on f in [sqrt(2)/2 - 1, sqrt(2) - 1]. For
// w >= sqrt(2)/2 - 1 it takes f = w itself, exact, not the rounded (1 + w) - 1 (whose error,
// 2^-25 absolute, is 2^-25 / |w| relative); below, 1 + w in [0, 0.71) is within half an ulp and
// its exponent and mantissa bits split it.
__attribute__((always_inline)) inline float log1p_nonpos(float w) {
  const float z = 1.0f + w;
  const std::int32_t i = __builtin_bit_cast(std::int32_t, z);
  const float m1 = __builtin_bit_cast(float, (i & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m1 > 1.41421356f;
  const bool near = w >= -0.29289321f;
  const float f = near ? w : (big ? m1 * 0.5f - 1.0f : m1 - 1.0f);
  const float e = near ? 0.0f : static_cast<float>(((i >> 23) & 0xff) - 127) + (big ? 1.0f : 0.0f);
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float r = f * f2 * p + e * -2.12194440e-4f;
  r = r - 0.5f * f2;
  return (f + r) + e * 0.693359375f;
}

// One row of reverse KL (DIV 1) or JSD (DIV 2) for scaled logits s (u_s) and t (u_t): four passes
// (max; sums; per-element terms; gradient). Per element, with d = log p_s - log p_t taken as
// (s - max_s) - (t - max_t) - (log S_s - log S_t), the last a row constant in double rounded once
// (not as the difference of two log-probabilities of size ~log V):
//   reverse KL: kd = sum p_s d,                                               q = d;
//   JSD:        kd = sum beta p_t (log p_t - log m) + (1 - beta) p_s (log p_s - log m), q = log p_s - log m,
//               m = beta p_t + (1 - beta) p_s.
// The row sum is second order in d while its terms are first order, so each term is taken
// accurate relative to itself: with p_big / p_small the larger / smaller side, e = p_small / p_big
// = e^-|d| and w_small the smaller side's weight, log p_big - log m = -log1p(w_small (e - 1))
// (one exp, one log1p; expm1 kept exact for small |d|) and log p_small - log m = that - |d|.
// Issue 25: the earlier log(m) per element carried an error of ~1 ulp of |log m| ~ log V into
// each term (2.7e-5 relative on Liger's functional JSD case; now ~1e-6, as the torch rows).
// Gradient w.r.t. u_s: c p_s (q - qbar) with c = 1 (reverse KL) or 1 - beta (JSD) and
// qbar = <p_s, q> / sum p_s, so each row sums to zero up to rounding. With Grad the third pass
// leaves p_s in s and p_s q in t, and the fourth is arithmetic only: c (p_s q - p_s qbar).
template <int DIV, bool Grad>
__attribute__((always_inline)) inline float div_row(float* __restrict s, float* __restrict t, float a, float beta,
                                                    std::int64_t V) {
  float ms = -std::numeric_limits<float>::infinity(), mt = ms;
#pragma omp simd reduction(max : ms, mt)
  for (std::int64_t v = 0; v < V; ++v) {
    ms = s[v] > ms ? s[v] : ms;
    mt = t[v] > mt ? t[v] : mt;
  }
  double Ss = 0.0, St = 0.0;
  for (std::int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const std::int64_t b1 = b0 + kBlock < V ? b0 + kBlock : V;
    float ss = 0.0f, st = 0.0f;
#pragma omp simd reduction(+ : ss, st)
    for (std::int64_t v = b0; v < b1; ++v) {
      ss += exp_nonpos(s[v] - ms);
      st += exp_nonpos(t[v] - mt);
    }
    Ss += ss;
    St += st;
  }
  const float ls0 = static_cast<float>(std::log(Ss)), lt0 = static_cast<float>(std::log(St));
  const float dc = static_cast<float>(std::log(Ss) - std::log(St));  // in double, rounded once
  const float omb = 1.0f - beta;
  double kd = 0.0, sum_ps = 0.0, sum_pq = 0.0;
  for (std::int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const std::int64_t b1 = b0 + kBlock < V ? b0 + kBlock : V;
    float k = 0.0f, sp = 0.0f, spq = 0.0f;
#pragma omp simd reduction(+ : k, sp, spq)
    for (std::int64_t v = b0; v < b1; ++v) {
      const float xs = s[v] - ms, xt = t[v] - mt;
      const float d = (xs - xt) - dc;  // masked teacher (-1e30): +1e30, finite
      float ps, pq, kv;
      if (DIV == 1) {
        ps = exp_nonpos(xs - ls0);
        pq = ps > 0.0f ? ps * d : 0.0f;
        kv = pq;
      } else {
        const bool sbig = d >= 0.0f;  // p_s >= p_t
        const float ad = sbig ? d : -d;
        float em1;
        const float e = exp_em1_nonpos(-ad, em1);  // p_small / p_big, and that - 1
        const float pbig = exp_nonpos(sbig ? xs - ls0 : xt - lt0);
        const float psmall = pbig * e;
        ps = sbig ? pbig : psmall;
        const float pt = sbig ? psmall : pbig;
        const float rbig = -log1p_nonpos((sbig ? beta : omb) * em1);  // log p_big - log m >= 0
        const float rs = sbig ? rbig : rbig - ad, rt = sbig ? rbig - ad : rbig;
        pq = ps > 0.0f ? ps * rs : 0.0f;
        kv = (pt > 0.0f ? beta * pt * rt : 0.0f) + omb * pq;
      }
      k += kv;
      sp += ps;
      spq += pq;
      if (Grad) {
        s[v] = ps;
        t[v] = pq;
      }
    }
    kd += k;
    sum_ps += sp;
    sum_pq += spq;
  }
  if (Grad) {
    const float qbar = static_cast<float>(sum_pq / sum_ps);
    const float c = DIV == 1 ? a : a * omb;
#pragma omp simd
    for (std::int64_t v = 0; v < V; ++v) s[v] = c * (t[v] - s[v] * qbar);
  }
  return static_cast<float>(kd);
}

// The divergence of k + 1 buckets from both sides' log-probabilities (double; k is small):
// returns kd and writes gb[b] = dD/dy_b (y_b: the student's bucket log-sum-exps).
double bucket_divergence(int div, double beta, const double* ls, const double* lt, double* gb, std::int64_t n) {
  double kd = 0.0, sum_ps = 0.0, sum_pq = 0.0;
  const double lb = std::log(beta), l1b = std::log1p(-beta);
  auto lae = [](double x, double y) {
    const double m = x > y ? x : y;
    return std::isinf(m) ? m : m + std::log1p(std::exp(-std::fabs(x - y)));
  };
  for (std::int64_t b = 0; b < n; ++b) {
    const double ps = std::exp(ls[b]), pt = std::exp(lt[b]);
    if (div == 0) {
      kd += pt > 0 ? pt * (lt[b] - ls[b]) : 0.0;
      gb[b] = ps - pt;
      continue;
    }
    const bool any = ps > 0 || pt > 0;
    const double d = any ? ls[b] - lt[b] : 0.0;
    double q;
    if (div == 1) {
      q = ps > 0 ? d : 0.0;
      kd += ps > 0 ? ps * d : 0.0;
    } else {
      q = -lae(l1b, lb - d);
      const double rt = -lae(lb, l1b + d);
      kd += (pt > 0 ? beta * pt * rt : 0.0) + (ps > 0 ? (1 - beta) * ps * q : 0.0);
    }
    gb[b] = q;
    sum_ps += ps;
    sum_pq += ps > 0 ? ps * q : 0.0;
  }
  if (div != 0) {
    const double qbar = sum_pq / sum_ps, c = div == 1 ? 1.0 : 1.0 - beta;
    for (std::int64_t b = 0; b < n; ++b) {
      const double ps = std::exp(ls[b]);
      gb[b] = ps > 0 ? c * ps * (gb[b] - qbar) : 0.0;
    }
  }
  return kd;
}

// One row with a top-k teacher (k entries + a tail bucket): the student's bucket log-sum-exps are
// its k logits and the exact log-sum-exp of all others (their exps summed with the k entries
// zeroed, no subtraction); the gradient of a tail entry is dD/dy_tail * p_j / P_tail.
template <bool Grad>
__attribute__((always_inline)) inline float topk_row(int div, float beta, float* __restrict s, const std::int64_t* idx,
                                                     const float* tv, std::int64_t k, float ttail, bool has_tail,
                                                     float a, std::int64_t V, double* work) {
  double* ls = work;              // [k + 1]
  double* lt = work + (k + 1);    // [k + 1]
  double* gb = work + 2 * (k + 1);
  float ms = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : ms)
  for (std::int64_t v = 0; v < V; ++v) ms = s[v] > ms ? s[v] : ms;
  for (std::int64_t j = 0; j < k; ++j) ls[j] = static_cast<double>(s[idx[j]] - ms);
  double Ss = 0.0;
  for (std::int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const std::int64_t b1 = b0 + kBlock < V ? b0 + kBlock : V;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (std::int64_t v = b0; v < b1; ++v) {
      const float e = exp_nonpos(s[v] - ms);
      s[v] = e;
      ss += e;
    }
    Ss += ss;
  }
  for (std::int64_t j = 0; j < k; ++j) s[idx[j]] = 0.0f;
  double Stail = 0.0;
  for (std::int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const std::int64_t b1 = b0 + kBlock < V ? b0 + kBlock : V;
    float st = 0.0f;
#pragma omp simd reduction(+ : st)
    for (std::int64_t v = b0; v < b1; ++v) st += s[v];
    Stail += st;
  }
  const double lSs = std::log(Ss);
  for (std::int64_t j = 0; j < k; ++j) ls[j] -= lSs;
  ls[k] = Stail > 0 ? std::log(Stail) - lSs : -std::numeric_limits<double>::infinity();
  // the teacher's log-softmax over its k values and the tail logit (-inf without a tail)
  double mt = has_tail ? static_cast<double>(ttail) : -std::numeric_limits<double>::infinity();
  for (std::int64_t j = 0; j < k; ++j) mt = std::max(mt, static_cast<double>(tv[j]));
  double St = has_tail ? std::exp(static_cast<double>(ttail) - mt) : 0.0;
  for (std::int64_t j = 0; j < k; ++j) St += std::exp(static_cast<double>(tv[j]) - mt);
  const double lSt = std::log(St) + mt;
  for (std::int64_t j = 0; j < k; ++j) lt[j] = static_cast<double>(tv[j]) - lSt;
  lt[k] = has_tail ? static_cast<double>(ttail) - lSt : -std::numeric_limits<double>::infinity();
  const double kd = bucket_divergence(div, beta, ls, lt, gb, k + 1);
  if (Grad) {
    const float coef = Stail > 0 ? static_cast<float>(a * gb[k] / Stail) : 0.0f;
#pragma omp simd
    for (std::int64_t v = 0; v < V; ++v) s[v] *= coef;
    for (std::int64_t j = 0; j < k; ++j) s[idx[j]] = static_cast<float>(a * gb[j]);
  }
  return static_cast<float>(kd);
}

// tanh(y) for finite y: odd Taylor polynomial below |y| = 0.0625 (relative error < 1e-9), else
// sign(y) (1 - e) / (1 + e) with e = exp(-2|y|) <= 1 (no cancellation there: 1 - e >= 0.118).
__attribute__((always_inline)) inline float tanh_f(float y) {
  const float ay = y < 0.0f ? -y : y;
  const float y2 = y * y;
  const float small = y * (1.0f + y2 * (-0.333333333f + y2 * (0.133333333f + y2 * -0.0539682540f)));
  const float e = exp_nonpos(-2.0f * ay);
  const float big = (1.0f - e) / (1.0f + e);
  return ay < 0.0625f ? small : (y < 0.0f ? -big : big);
}

// Softcap rows in one pass: x = post * c * tanh(x * inv_c); deriv (or null) = 1 - tanh^2.
template <bool Deriv>
__attribute__((always_inline)) inline void cap_row(float* __restrict x, float* __restrict d, float inv_c, float cp,
                                                   std::int64_t V) {
#pragma omp simd
  for (std::int64_t v = 0; v < V; ++v) {
    const float th = tanh_f(x[v] * inv_c);
    if (Deriv) d[v] = 1.0f - th * th;
    x[v] = x[v] <= -1e30f ? x[v] : cp * th;  // masked (-inf / -1e30) entries stay masked
  }
}

template <bool Deriv>
__attribute__((target("avx2,fma"))) void cap_avx2(float* x, std::int64_t ldx, float* d, std::int64_t ldd,
                                                  float inv_c, float cp, std::int64_t lo, std::int64_t hi,
                                                  std::int64_t V) {
  for (std::int64_t i = lo; i < hi; ++i) cap_row<Deriv>(x + i * ldx, Deriv ? d + i * ldd : nullptr, inv_c, cp, V);
}

template <bool Deriv>
void cap_base(float* x, std::int64_t ldx, float* d, std::int64_t ldd, float inv_c, float cp, std::int64_t lo,
              std::int64_t hi, std::int64_t V) {
  for (std::int64_t i = lo; i < hi; ++i) cap_row<Deriv>(x + i * ldx, Deriv ? d + i * ldd : nullptr, inv_c, cp, V);
}

template <int DIV, bool Grad>
__attribute__((target("avx2,fma"))) void div_avx2(float* s, std::int64_t lds, float* t, std::int64_t ldt,
                                                  const float* a, float* kd, float beta, std::int64_t lo,
                                                  std::int64_t hi, std::int64_t V) {
  for (std::int64_t i = lo; i < hi; ++i)
    kd[i] = div_row<DIV, Grad>(s + i * lds, t + i * ldt, a ? a[i] : 0.0f, beta, V);
}

template <int DIV, bool Grad>
void div_base(float* s, std::int64_t lds, float* t, std::int64_t ldt, const float* a, float* kd, float beta,
              std::int64_t lo, std::int64_t hi, std::int64_t V) {
  for (std::int64_t i = lo; i < hi; ++i)
    kd[i] = div_row<DIV, Grad>(s + i * lds, t + i * ldt, a ? a[i] : 0.0f, beta, V);
}

template <bool Grad>
__attribute__((target("avx2,fma"))) void topk_avx2(int div, float beta, float* s, std::int64_t lds,
                                                   const std::int64_t* idx, const float* tv, std::int64_t k,
                                                   const float* tail, const float* a, float* kd, std::int64_t lo,
                                                   std::int64_t hi, std::int64_t V, double* work) {
  for (std::int64_t i = lo; i < hi; ++i)
    kd[i] = topk_row<Grad>(div, beta, s + i * lds, idx + i * k, tv + i * k, k, tail ? tail[i] : 0.0f,
                           tail != nullptr, a ? a[i] : 0.0f, V, work);
}

template <bool Grad>
void topk_base(int div, float beta, float* s, std::int64_t lds, const std::int64_t* idx, const float* tv,
               std::int64_t k, const float* tail, const float* a, float* kd, std::int64_t lo, std::int64_t hi,
               std::int64_t V, double* work) {
  for (std::int64_t i = lo; i < hi; ++i)
    kd[i] = topk_row<Grad>(div, beta, s + i * lds, idx + i * k, tv + i * k, k, tail ? tail[i] : 0.0f,
                           tail != nullptr, a ? a[i] : 0.0f, V, work);
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

void kd_div_rows(int div, float beta, float* s, std::int64_t lds, float* t, std::int64_t ldt, const float* a,
                 float* kd, std::int64_t rows, std::int64_t V, bool need_grad, int n_threads) {
  if (rows <= 0 || V <= 0) return;
  const int T = row_threads(n_threads, rows, V);
  const bool avx2 = has_avx2_fma();
  parallel_blocks(T, 0, rows, [&](int, std::int64_t lo, std::int64_t hi) {
#define MINITRON_DIV_CASE(D, G)                                             \
  if (avx2) div_avx2<D, G>(s, lds, t, ldt, a, kd, beta, lo, hi, V);         \
  else div_base<D, G>(s, lds, t, ldt, a, kd, beta, lo, hi, V);
    if (div == 1) {
      if (need_grad) { MINITRON_DIV_CASE(1, true) } else { MINITRON_DIV_CASE(1, false) }
    } else {
      if (need_grad) { MINITRON_DIV_CASE(2, true) } else { MINITRON_DIV_CASE(2, false) }
    }
#undef MINITRON_DIV_CASE
  });
}

void kd_topk_rows(int div, float beta, float* s, std::int64_t lds, const std::int64_t* idx, const float* tv,
                  std::int64_t k, const float* tail, const float* a, float* kd, std::int64_t rows, std::int64_t V,
                  bool need_grad, int n_threads) {
  if (rows <= 0 || V <= 0) return;
  const int T = row_threads(n_threads, rows, V);
  const bool avx2 = has_avx2_fma();
  parallel_blocks(T, 0, rows, [&](int, std::int64_t lo, std::int64_t hi) {
    std::vector<double> work(3 * (k + 1));
    if (avx2) {
      need_grad ? topk_avx2<true>(div, beta, s, lds, idx, tv, k, tail, a, kd, lo, hi, V, work.data())
                : topk_avx2<false>(div, beta, s, lds, idx, tv, k, tail, a, kd, lo, hi, V, work.data());
    } else {
      need_grad ? topk_base<true>(div, beta, s, lds, idx, tv, k, tail, a, kd, lo, hi, V, work.data())
                : topk_base<false>(div, beta, s, lds, idx, tv, k, tail, a, kd, lo, hi, V, work.data());
    }
  });
}

void softcap_rows(float* x, std::int64_t ldx, float* deriv, std::int64_t ldd, float c, float post, std::int64_t rows,
                  std::int64_t V, int n_threads) {
  if (rows <= 0 || V <= 0) return;
  const int T = row_threads(n_threads, rows, V);
  const bool avx2 = has_avx2_fma();
  const float inv_c = 1.0f / c, cp = c * post;
  parallel_blocks(T, 0, rows, [&](int, std::int64_t lo, std::int64_t hi) {
    if (deriv) {
      avx2 ? cap_avx2<true>(x, ldx, deriv, ldd, inv_c, cp, lo, hi, V) : cap_base<true>(x, ldx, deriv, ldd, inv_c, cp, lo, hi, V);
    } else {
      avx2 ? cap_avx2<false>(x, ldx, deriv, ldd, inv_c, cp, lo, hi, V)
           : cap_base<false>(x, ldx, deriv, ldd, inv_c, cp, lo, hi, V);
    }
  });
}

}  // namespace minitron
