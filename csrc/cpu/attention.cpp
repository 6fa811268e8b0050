// Softmax attention, fp32: o = softmax(q k^T * scale) v per (batch, head).
//
// Phase 1 packs every head's K transposed (Kt [D, Mp], Mp = M rounded up to 8, zero-padded)
// and V ([M, Dp], Dp = D rounded up to 8) so the GEMM tiles stream 8-float vectors.
// Phase 2 runs over (batch, head, block of kQueryBlock queries): for each block of keys,
//   S = (Q * scale) Kt[:, blk]                     (AVX2 FMA tiles, common.h gemm)
//   m' = max(m, rowmax(S)), P = exp(S - m'), l = l e^(m - m') + rowsum(P)
//   O = O e^(m - m') + P V[blk]
// and finally o = O / l. With M <= kWholeKV the single key block holds the whole K/V of a
// head (cross-attention: 77 x chunks keys), so the softmax is the exact one-block softmax
// and K/V stay in cache for every query block; longer M runs the tiled online-softmax loop.
#include <omp.h>

#include <vector>

#include "common.h"
#include "kernels.h"

namespace sdfast {
namespace cpu {
namespace {

constexpr int64_t kQueryBlock = 32;
constexpr int64_t kWholeKV = 512;
constexpr int64_t kKeyBlock = 256;

void pack_head(const AttentionParams& p, int64_t b, int64_t h, int64_t Mp, int64_t Dp, float* kt,
               float* vp) {
  const float* k = p.k + b * p.skb + h * p.skh;
  const float* v = p.v + b * p.svb + h * p.svh;
  std::fill(kt, kt + p.D * Mp, 0.0f);
  for (int64_t j = 0; j < p.M; ++j)
    for (int64_t d = 0; d < p.D; ++d) kt[d * Mp + j] = k[j * p.skm + d];
  for (int64_t j = 0; j < p.M; ++j) {
    std::copy(v + j * p.svm, v + j * p.svm + p.D, vp + j * Dp);
    std::fill(vp + j * Dp + p.D, vp + (j + 1) * Dp, 0.0f);
  }
}

// dst[0, n) = src[0, n) * scale.
inline void scale_row(const float* src, float* dst, int64_t n, float scale) {
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_loadu_ps(src + d), vs));
  for (; d < n; ++d) dst[d] = src[d] * scale;
}

// Online-softmax update of `rows` rows of (scaled) scores S (row stride lds, kb valid columns):
// S becomes P in place; O rows (stride Dp) are rescaled; m and l updated.
void softmax_block(float* S, int64_t lds, int64_t rows, int64_t kb, float* O, int64_t Dp, float* m,
                   float* l, bool first) {
  const __m256i mask = tail_mask(kb % 8);
  const int64_t kb8 = kb / 8 * 8;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * lds;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < kb8; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
    float mx = hmax256(vmax);
    for (int64_t j = kb8; j < kb; ++j) mx = std::max(mx, s[j]);
    const float m_new = std::max(first ? -INFINITY : m[r], mx);
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < kb8; j += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
      _mm256_storeu_ps(s + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    if (kb8 < kb) {
      __m256 e = exp256(_mm256_sub_ps(_mm256_maskload_ps(s + kb8, mask), vm));
      e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
      _mm256_maskstore_ps(s + kb8, mask, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    const float sum = hsum256(vsum);
    if (first) {
      l[r] = sum;
    } else {
      const float corr = std::exp(m[r] - m_new);
      l[r] = l[r] * corr + sum;
      const __m256 vc = _mm256_set1_ps(corr);
      for (int64_t d = 0; d < Dp; d += 8)
        _mm256_storeu_ps(O + r * Dp + d, _mm256_mul_ps(_mm256_loadu_ps(O + r * Dp + d), vc));
    }
    m[r] = m_new;
  }
}

struct Scratch {
  std::vector<float> Q, S, O, m, l;
};

void query_block(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                 const float* kt, const float* vp, int64_t Mp, int64_t Dp, int64_t KB, Scratch& w) {
  const int64_t lds = round_up(KB, 8);
  // Pack the query rows (contiguous, row stride Dp): strided rows straight from memory
  // would make every GEMM broadcast a cache miss.
  // The softmax scale is folded in here (scores come out scaled).
  const int64_t D = p.D, sqn = p.sqn, son = p.son;
  const float* qsrc = p.q + b * p.sqb + h * p.sqh + i0 * sqn;
  float* q = w.Q.data();
  for (int64_t r = 0; r < rows; ++r) scale_row(qsrc + r * sqn, q + r * Dp, D, p.scale);
  for (int64_t j0 = 0; j0 < p.M; j0 += KB) {
    const int64_t kb = std::min(KB, p.M - j0);
    const bool first = j0 == 0;
    // all round_up(kb, 8) columns: Kt's zero padding makes the extra scores 0, never read
    gemm(q, Dp, kt + j0, Mp, w.S.data(), lds, rows, round_up(kb, 8), p.D, false);
    softmax_block(w.S.data(), lds, rows, kb, w.O.data(), Dp, w.m.data(), w.l.data(), first);
    gemm(w.S.data(), lds, vp + j0 * Dp, Dp, w.O.data(), Dp, rows, p.D, kb, !first);
  }
  float* o = p.o + b * p.sob + h * p.soh + i0 * son;
  for (int64_t r = 0; r < rows; ++r) scale_row(&w.O[r * Dp], o + r * son, D, 1.0f / w.l[r]);
}

}  // namespace

void attention(const AttentionParams& p) {
  const int64_t BH = p.B * p.H, Mp = round_up(p.M, 8), Dp = round_up(p.D, 8);
  int64_t KB = p.key_block > 0 ? p.key_block : (p.M <= kWholeKV ? p.M : kKeyBlock);
  if (KB < p.M) KB = round_up(KB, 8);  // key blocks after the first start on a vector boundary
  std::vector<float> kt(BH * p.D * Mp), vp(BH * p.M * Dp);
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < BH; ++bh)
    pack_head(p, bh / p.H, bh % p.H, Mp, Dp, &kt[bh * p.D * Mp], &vp[bh * p.M * Dp]);

  // A task is one block of queries of one batch entry, for every head in turn: q and o rows
  // of the usual [B, N, H, D] layout are then read and written whole, and the K/V of all
  // heads (H x 2 x M x D floats; 200 KB for SD1.5 cross-attention) stay in L2.
  const int64_t nqb = (p.N + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel
  {
    Scratch w;
    w.Q.resize(kQueryBlock * Dp);
    w.S.resize(kQueryBlock * round_up(KB, 8));
    w.O.resize(kQueryBlock * Dp);
    w.m.resize(kQueryBlock);
    w.l.resize(kQueryBlock);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.B * nqb; ++t) {
      const int64_t b = t / nqb, i0 = (t % nqb) * kQueryBlock;
      for (int64_t h = 0; h < p.H; ++h) {
        const int64_t bh = b * p.H + h;
        query_block(p, b, h, i0, std::min(kQueryBlock, p.N - i0), &kt[bh * p.D * Mp],
                    &vp[bh * p.M * Dp], Mp, Dp, KB, w);
      }
    }
  }
}

}  // namespace cpu
}  // namespace sdfast
