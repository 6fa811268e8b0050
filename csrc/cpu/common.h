// Shared helpers of sdfast's CPU kernels: AVX2 exp, horizontal sums, a packed-B GEMM tile.
// Torch-free: raw pointers, sizes and strides only.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace sdfast {
namespace cpu {

// exp(x) for 8 floats: x = n*ln2 + r, |r| <= ln2/2, degree-6 polynomial (Cephes expf), 2^n
// added to the exponent bits. About 1 ulp over [-87, 88]; inputs below -87 give 0.
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 out = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(below, out);
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline double hsum256d(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// Lane mask with the first n (0..8) lanes set, for maskload / maskstore of a row's tail.
inline __m256i tail_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[m, n] (+)= A[m, k] @ B[k, n] for m <= 4 rows and n <= 24 columns.
// A: row stride lda, unit column stride. B: packed, row stride ldb, and readable (zero-padded)
// up to a multiple of 8 columns. C: row stride ldc; only its first n columns are touched.
// MR rows x NV vectors of 8 columns are held in registers across the whole k loop.
template <int MR, int NV>
inline void gemm_tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, int64_t n, int64_t k, bool accumulate) {
  // Fully unrolled loops keep acc in registers (without them GCC spills it every step).
  __m256 acc[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    __m256 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + p * ldb + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + p);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t left = n - 8 * v;
    if (left >= 8) {  // plain loads and stores: masked ones are slow on some CPUs (AMD)
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        float* c = C + r * ldc + 8 * v;
        _mm256_storeu_ps(c, accumulate ? _mm256_add_ps(acc[r][v], _mm256_loadu_ps(c)) : acc[r][v]);
      }
      continue;
    }
    const __m256i mask = tail_mask(left);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc + 8 * v;
      __m256 out = acc[r][v];
      if (accumulate) out = _mm256_add_ps(out, _mm256_maskload_ps(c, mask));
      _mm256_maskstore_ps(c, mask, out);
    }
  }
}

template <int MR>
inline void gemm_rows(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, int64_t n, int64_t k, bool accumulate) {
  int64_t j = 0;
  for (; j + 24 <= n; j += 24) gemm_tile<MR, 3>(A, lda, B + j, ldb, C + j, ldc, 24, k, accumulate);
  const int64_t left = n - j;
  if (left > 16) gemm_tile<MR, 3>(A, lda, B + j, ldb, C + j, ldc, left, k, accumulate);
  else if (left > 8) gemm_tile<MR, 2>(A, lda, B + j, ldb, C + j, ldc, left, k, accumulate);
  else if (left > 0) gemm_tile<MR, 1>(A, lda, B + j, ldb, C + j, ldc, left, k, accumulate);
}

// C[m, n] (+)= A[m, k] @ B[k, n], single-threaded; B packed as for gemm_tile.
inline void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                 int64_t m, int64_t n, int64_t k, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) gemm_rows<4>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, n, k, accumulate);
  switch (m - i) {
    case 3: gemm_rows<3>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, n, k, accumulate); break;
    case 2: gemm_rows<2>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, n, k, accumulate); break;
    case 1: gemm_rows<1>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, n, k, accumulate); break;
    default: break;
  }
}

}  // namespace cpu
}  // namespace sdfast
