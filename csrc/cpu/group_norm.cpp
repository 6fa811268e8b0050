// GroupNorm (+ optional per-(batch, channel) add before the norm, + optional SiLU), fp32.
//
// Three phases, each an OpenMP loop; the data is read twice (statistics, then normalise):
//   1. per-channel statistics (mean_c, M2_c) in double, summing x - shift_c with shift_c the
//      channel's first element (no cancellation in sum(d^2) - sum(d)^2 / S);
//   2. per-group Chan combination: mean_g = avg_c mean_c, M2_g = sum_c M2_c + S sum_c
//      (mean_c - mean_g)^2, with add[b, c] folded into mean_c (it shifts a channel, not its
//      spread); then per channel y = x * a_c + t_c with a_c = rstd_g w_c, t_c = b_c + (add_c -
//      mean_g) a_c;
//   3. normalise rows: contiguous per channel (NCHW) or per position (channels-last).
#include <omp.h>

#include <vector>

#include "common.h"
#include "kernels.h"

namespace sdfast {
namespace cpu {
namespace {

struct Moments { double mean, m2; };

// Statistics of one contiguous row of n floats.
Moments row_moments(const float* x, int64_t n) {
  const double shift = x[0];
  const __m256d sh = _mm256_set1_pd(shift);
  __m256d s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd();
  __m256d t1 = _mm256_setzero_pd(), t2 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256d lo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), sh);
    const __m256d hi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), sh);
    s1 = _mm256_add_pd(s1, lo);
    s2 = _mm256_fmadd_pd(lo, lo, s2);
    t1 = _mm256_add_pd(t1, hi);
    t2 = _mm256_fmadd_pd(hi, hi, t2);
  }
  double a = hsum256d(_mm256_add_pd(s1, t1)), b = hsum256d(_mm256_add_pd(s2, t2));
  for (; i < n; ++i) {
    const double d = x[i] - shift;
    a += d;
    b += d * d;
  }
  return {shift + a / n, std::max(b - a * a / n, 0.0)};
}

// Statistics of channels [c0, c0 + cn) of a channels-last image: S rows of stride sxs.
constexpr int64_t kChannelBlock = 64;
void block_moments(const float* x, int64_t S, int64_t sxs, int64_t cn, Moments* out) {
  double shift[kChannelBlock], s1[kChannelBlock] = {0}, s2[kChannelBlock] = {0};
  for (int64_t c = 0; c < cn; ++c) shift[c] = x[c];
  for (int64_t s = 0; s < S; ++s) {
    const float* row = x + s * sxs;
#pragma omp simd
    for (int64_t c = 0; c < cn; ++c) {
      const double d = static_cast<double>(row[c]) - shift[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
  for (int64_t c = 0; c < cn; ++c)
    out[c] = {shift[c] + s1[c] / S, std::max(s2[c] - s1[c] * s1[c] / S, 0.0)};
}

inline __m256 silu256(__m256 y) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(y, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), y))));
}

inline float silu1(float y) { return y / (1.0f + std::exp(-y)); }

// y[i] = act(x[i] * a + t) over a contiguous row, one (a, t) for the whole row.
void affine_row(const float* x, float* y, int64_t n, float a, float t, bool silu) {
  const __m256 va = _mm256_set1_ps(a), vt = _mm256_set1_ps(t);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 r = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), va, vt);
    _mm256_storeu_ps(y + i, silu ? silu256(r) : r);
  }
  for (; i < n; ++i) {
    const float r = std::fma(x[i], a, t);
    y[i] = silu ? silu1(r) : r;
  }
}

// y[i] = act(x[i] * a[i] + t[i]) over a contiguous row.
void affine_row(const float* x, float* y, int64_t n, const float* a, const float* t, bool silu) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 r = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(a + i), _mm256_loadu_ps(t + i));
    _mm256_storeu_ps(y + i, silu ? silu256(r) : r);
  }
  for (; i < n; ++i) {
    const float r = std::fma(x[i], a[i], t[i]);
    y[i] = silu ? silu1(r) : r;
  }
}

}  // namespace

void group_norm(const GroupNormParams& p) {
  const int64_t B = p.B, C = p.C, S = p.S, G = p.G, Cg = C / G;
  const bool channels_last = p.sxs != 1;  // then sxc == 1 (checked on the Python side)
  std::vector<Moments> mom(B * C);
  std::vector<float> scale(B * C), shift(B * C);

  // 1. per-channel moments
  if (!channels_last) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      mom[bc] = row_moments(p.x + b * p.sxb + c * p.sxc, S);
    }
  } else {
    const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static)
    for (int64_t bk = 0; bk < B * nblk; ++bk) {
      const int64_t b = bk / nblk, c0 = (bk % nblk) * kChannelBlock;
      block_moments(p.x + b * p.sxb + c0, S, p.sxs, std::min(kChannelBlock, C - c0), &mom[b * C + c0]);
    }
  }

  // 2. group statistics -> per-channel affine
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * Cg;
      double mean = 0.0;
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        double m = mom[b * C + c].mean;
        if (p.add) m += p.add[b * p.sab + c * p.sac];
        mom[b * C + c].mean = m;
        mean += m;
      }
      mean /= Cg;
      double m2 = 0.0;
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        const double d = mom[b * C + c].mean - mean;
        m2 += mom[b * C + c].m2 + S * d * d;
      }
      const double rstd = 1.0 / std::sqrt(m2 / (static_cast<double>(S) * Cg) + p.eps);
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        const double w = p.weight ? p.weight[c] : 1.0, bias = p.bias ? p.bias[c] : 0.0;
        const double a = rstd * w;
        const double add = p.add ? p.add[b * p.sab + c * p.sac] : 0.0;
        scale[b * C + c] = static_cast<float>(a);
        shift[b * C + c] = static_cast<float>(bias + (add - mean) * a);
      }
    }
  }

  // 3. normalise
  if (!channels_last) {
#pragma omp parallel for schedule(static)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      affine_row(p.x + b * p.sxb + c * p.sxc, p.y + b * p.syb + c * p.syc, S, scale[bc], shift[bc], p.silu);
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t bs = 0; bs < B * S; ++bs) {
      const int64_t b = bs / S, s = bs % S;
      affine_row(p.x + b * p.sxb + s * p.sxs, p.y + b * p.syb + s * p.sys, C, &scale[b * C], &shift[b * C], p.silu);
    }
  }
}

}  // namespace cpu
}  // namespace sdfast
