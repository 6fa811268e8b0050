// Softmax attention, fp32: o = softmax(q k^T * scale) v per (batch, head).
//
// One OpenMP region in two loops. The first packs every head's K transposed (Kt [D, Mp], Mp =
// M rounded up to whole vectors, zero-padded) and V ([M, Dp]) so the GEMM tiles (gemm.h)
// stream whole vectors. The second runs over blocks of kQueryBlock queries (see attention()
// for the task order); per head, for each block of keys:
//   S = Q Kt[:, blk]                                (register-blocked GEMM, k = D)
//   m' = max(m, rowmax(S)), P = exp(scale (S - m')), l = l c + rowsum(P), c = e^(scale (m - m'))
//   O = O c + P V[blk]                              (register-blocked GEMM, k = keys)
// and finally o = O / l. With M <= kWholeKV one key block holds the whole K/V of a head
// (cross-attention: 77 x chunks keys): the softmax is the exact one-block softmax, with no
// rescaling, K/V stay in cache for every query block, and o = (P V) / l is written straight
// from the GEMM's registers. Longer M runs the tiled online-softmax loop; from 600 keys at a
// head dim that is not whole vectors, or from 2048 keys, in a transposed layout with the
// queries along the vector lanes instead (attention_t below; the choice is in attention()).
#include <omp.h>

#include <cmath>
#include <memory>

#include "gemm.h"
#include "isa_kernels.h"
#include "simd.h"

namespace sdfast {
namespace cpu {
namespace SDFAST_ISA {
namespace {

// Queries per block: a multiple of the tile heights (gemm.h: AVX2 6; AVX-512 5 and 8).
constexpr int64_t kQueryBlock = kRegs < 32 ? 48 : 40;
constexpr int64_t kWholeKV = 512;
constexpr int64_t kKeyBlock = 256;
constexpr int64_t kKVCacheBytes = 1 << 20;  // packed K/V of all heads that stay in L2 together

struct Shape {
  int64_t Mp, Dp, KB, lds;  // padded keys, padded head dim, key block, score row stride
};

void pack_head(const AttentionParams& p, const Shape& s, int64_t b, int64_t h, float* kt, float* vp) {
  const float* k = p.k + b * p.skb + h * p.skh;
  const float* v = p.v + b * p.svb + h * p.svh;
  // Kt = K^T in blocks of 16 keys: 16 rows of K are live at a time (all M rows at a stride
  // of H * D floats would map onto a few L1 sets and evict each other).
  for (int64_t j0 = 0; j0 < p.M; j0 += 16)
    for (int64_t d = 0; d < p.D; ++d)
      for (int64_t j = j0; j < imin(j0 + 16, p.M); ++j) kt[d * s.Mp + j] = k[j * p.skm + d];
  for (int64_t d = 0; d < p.D; ++d) zero_n(kt + d * s.Mp + p.M, s.Mp - p.M);
  for (int64_t j = 0; j < p.M; ++j) {
    copy_n(v + j * p.svm, p.D, vp + j * s.Dp);
    zero_n(vp + j * s.Dp + p.D, s.Dp - p.D);
  }
}

// dst[0, n) = src[0, n) * scale.
inline void scale_row(const float* src, float* dst, int64_t n, float scale) {
  const vf vs = vset(scale);
  int64_t d = 0;
  for (; d + kW <= n; d += kW) vstore(dst + d, vmul(vload(src + d), vs));
  if (d < n) vstore_n(dst + d, vmul(vload_n(src + d, n - d), vs), n - d);
}

// Softmax update of R rows of raw scores S (row stride lds >= kb rounded up to whole vectors,
// kb valid columns), the softmax scale applied inside the exponent: S becomes
// P = exp(scale (S - m')) in place, with m' = max(m, rowmax S); l is updated and, after the
// first key block, corr = exp(scale (m - m')) returned for rescaling O. R rows at once keep
// R independent chains of reductions in flight.
template <int R>
inline void softmax_rows(float* S, int64_t lds, int64_t kb, float scale, float* m, float* l, float* corr, bool first) {
  const int64_t nv = (kb + kW - 1) / kW, left = kb - (nv - 1) * kW;
  vf mx[R], sh[R], acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) mx[r] = vload_n(S + r * lds + (nv - 1) * kW, left, -INFINITY);
  for (int64_t v = 0; v + 1 < nv; ++v)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) mx[r] = vmax(mx[r], vload(S + r * lds + v * kW));
  float m_new[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float x = vhmax(mx[r]);
    m_new[r] = first || x > m[r] ? x : m[r];
    sh[r] = vset(-scale * m_new[r]);
    acc[r] = vzero();
  }
  const vf vs = vset(scale);
  for (int64_t v = 0; v < nv; ++v)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* s = S + r * lds + v * kW;
      vf e = vexp(vfma(vload(s), vs, sh[r]));
      if (v + 1 == nv) e = vkeep_n(e, left);  // lanes past kb: whatever they held, now 0
      vstore(s, e);
      acc[r] = vadd(acc[r], e);
    }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float sum = vsum(acc[r]);
    if (first) {
      l[r] = sum;
    } else {
      corr[r] = std::exp(scale * (m[r] - m_new[r]));
      l[r] = l[r] * corr[r] + sum;
    }
    m[r] = m_new[r];
  }
}

void softmax_block(float* S, int64_t lds, int64_t rows, int64_t kb, float scale, float* O, int64_t Dp, float* m,
                   float* l, bool first) {
  float corr[4];
  for (int64_t r = 0; r < rows; r += 4) {
    const int64_t n = imin(4, rows - r);
    float* Sr = S + r * lds;
    switch (n) {
      case 4: softmax_rows<4>(Sr, lds, kb, scale, m + r, l + r, corr, first); break;
      case 3: softmax_rows<3>(Sr, lds, kb, scale, m + r, l + r, corr, first); break;
      case 2: softmax_rows<2>(Sr, lds, kb, scale, m + r, l + r, corr, first); break;
      default: softmax_rows<1>(Sr, lds, kb, scale, m + r, l + r, corr, first); break;
    }
    if (!first)
      for (int64_t i = 0; i < n; ++i) scale_row(O + (r + i) * Dp, O + (r + i) * Dp, Dp, corr[i]);
  }
}

struct Scratch {
  Scratch(const AttentionParams& p, const Shape& s)
      : S(kQueryBlock * s.lds), O(p.M > s.KB ? kQueryBlock * s.Dp : 0), m(kQueryBlock), l(kQueryBlock) {}
  Buf<float> S, O, m, l;
};

// Queries [i0, i0 + rows) of head (b, h). The GEMMs read q's rows in place (broadcasts: any
// row stride is fine) and, with one key block, write o's rows in place too, 1/l applied in
// their epilogue.
void query_block(const AttentionParams& p, const Shape& s, int64_t b, int64_t h, int64_t i0, int64_t rows,
                 const float* kt, const float* vp, Scratch& w) {
  const float* q = p.q + b * p.sqb + h * p.sqh + i0 * p.sqn;
  float* o = p.o + b * p.sob + h * p.soh + i0 * p.son;
  float *S = w.S.data(), *m = w.m.data(), *l = w.l.data();
  if (s.KB >= p.M) {
    gemm<false>(q, p.sqn, kt, s.Mp, S, s.lds, rows, s.Mp, p.D);
    softmax_block(S, s.lds, rows, p.M, p.scale, nullptr, 0, m, l, true);
    for (int64_t r = 0; r < rows; ++r) l[r] = 1.0f / l[r];
    gemm<false>(S, s.lds, vp, s.Dp, o, p.son, rows, p.D, p.M, l);
    return;
  }
  float* O = w.O.data();
  for (int64_t j0 = 0; j0 < p.M; j0 += s.KB) {
    const int64_t kb = imin(s.KB, p.M - j0);
    const bool first = j0 == 0;
    // whole vectors of scores: Kt's zero padding (or the next block's keys) fill the rest
    gemm<false>(q, p.sqn, kt + j0, s.Mp, S, s.lds, rows, round_up(kb, kW), p.D);
    softmax_block(S, s.lds, rows, kb, p.scale, O, s.Dp, m, l, first);
    if (first) gemm<false>(S, s.lds, vp + j0 * s.Dp, s.Dp, O, s.Dp, rows, s.Dp, kb);
    else gemm<true>(S, s.lds, vp + j0 * s.Dp, s.Dp, O, s.Dp, rows, s.Dp, kb);
  }
  for (int64_t r = 0; r < rows; ++r) scale_row(O + r * s.Dp, o + r * p.son, p.D, 1.0f / l[r]);
}

// n floats for the packed K/V of one call: the calling thread's buffer, kept between its calls
// (no fresh pages per call) up to kKeepKV floats; a larger one (e.g. 16384 tokens) only for
// this call, in `local`.
constexpr int64_t kKeepKV = int64_t(1) << 24;  // 64 MB (SD1.5 64x64 self-attention: 21 MB)

float* kv_buffer(int64_t n, Buf<float>& local) {
  static thread_local Buf<float> kept;
  if (n > kKeepKV) {
    local.resize(n);
    return local.data();
  }
  kept.reserve(n);
  return kept.data();
}

// One attention call: pack(b, h, kv) packs each head's K and V into its kv_size floats of a
// buffer; then block(b, h, i0, rows, kv, scratch) runs blocks of qb queries, a scratch made by
// make_scratch() per thread. A task is a block of queries of one batch entry, for every head in
// turn when the K/V of all heads fit in L2 (cross-attention: H x 2 x 77 x D floats, 200-800 KB
// for SD1.5): the q and o rows of the usual [B, N, H, D] layout are then read and written
// whole. Otherwise (self-attention) a task is one head's block and tasks go head by head, so
// that head's K/V stays in L2 from one query block to the next.
template <class MakeScratch, class Pack, class Block>
void run_tasks(const AttentionParams& p, int64_t kv_size, int64_t qb, MakeScratch make_scratch, Pack pack,
               Block block) {
  const int64_t BH = p.B * p.H;
  Buf<float> local;
  float* const kv = kv_buffer(BH * kv_size, local);  // (a thread_local named inside the parallel
                                                     // region would be each worker's own)
  const bool all_heads = p.H * kv_size * 4 <= kKVCacheBytes;
  const int64_t hpt = all_heads ? p.H : 1, groups = p.H / hpt;
  const int64_t nqb = (p.N + qb - 1) / qb, tasks = p.B * groups * nqb;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) pack(bh / p.H, bh % p.H, kv + bh * kv_size);
    auto w = make_scratch();
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bg = t / nqb, i0 = t % nqb * qb, b = bg / groups;
      for (int64_t h = bg % groups * hpt; h < (bg % groups + 1) * hpt; ++h)
        block(b, h, i0, imin(qb, p.N - i0), kv + (b * p.H + h) * kv_size, *w);
    }
  }
}

// --- queries in the vector lanes -------------------------------------------------------------
// With a head dim that is not whole vectors (SD1.5's 40 on AVX-512) the row layout above pads
// P V's columns to whole vectors (48 of 40: a fifth more FMAs). Transposed, the queries run
// along the lanes and the head dim is a broadcast dimension, padded nowhere:
//   S^T = K[blk] Q^T                 ([kb, QB], keys as rows, k = D)
//   O^T = O^T c + V[blk]^T P^T       ([D, QB], k = kb)
// and the softmax over the keys is lane-wise: maxima and sums run down the rows, with no
// horizontal reductions. Per head K is packed [M, D] and V transposed [D, Mp].
constexpr int kQV = kRegs < 32 ? 2 : 3;  // query vectors per block: 8 x 3 (AVX-512), 6 x 2 tiles
constexpr int64_t kQB = kQV * kW;
constexpr int64_t kKeyBlockT = 128;      // P^T [128, 48] (24 KB) is read once per 8 rows of O^T: L1

void pack_head_t(const AttentionParams& p, int64_t Mp, int64_t b, int64_t h, float* kp, float* vt) {
  const float* k = p.k + b * p.skb + h * p.skh;
  const float* v = p.v + b * p.svb + h * p.svh;
  for (int64_t j = 0; j < p.M; ++j) copy_n(k + j * p.skm, p.D, kp + j * p.D);
  for (int64_t j0 = 0; j0 < p.M; j0 += 16)
    for (int64_t d = 0; d < p.D; ++d)
      for (int64_t j = j0; j < imin(j0 + 16, p.M); ++j) vt[d * Mp + j] = v[j * p.svm + d];
}

struct ScratchT {
  ScratchT(const AttentionParams& p, int64_t KB) : Qt(p.D * kQB), S(KB * kQB), O(p.D * kQB) {}
  Buf<float> Qt, S, O;
};

// Queries [i0, i0 + rows) (rows <= kQB) of head (b, h); lanes past `rows` compute on zero
// queries and are never written out.
void query_block_t(const AttentionParams& p, int64_t Mp, int64_t KB, int64_t b, int64_t h, int64_t i0, int64_t rows,
                   const float* kp, const float* vt, ScratchT& w) {
  const float* q = p.q + b * p.sqb + h * p.sqh + i0 * p.sqn;
  float* o = p.o + b * p.sob + h * p.soh + i0 * p.son;
  float *Qt = w.Qt.data(), *S = w.S.data(), *O = w.O.data();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < p.D; ++d) Qt[d * kQB + i] = q[i * p.sqn + d];
  if (rows < kQB)
    for (int64_t d = 0; d < p.D; ++d) zero_n(Qt + d * kQB + rows, kQB - rows);
  const vf vs = vset(p.scale), vns = vset(-p.scale);
  vf m[kQV], l[kQV];
  for (int64_t j0 = 0; j0 < p.M; j0 += KB) {
    const int64_t kb = imin(KB, p.M - j0);
    const bool first = j0 == 0;
    gemm<false>(kp + j0 * p.D, p.D, Qt, kQB, S, kQB, kb, kQB, p.D);
    vf mx[kQV], sh[kQV], acc[2][kQV];
    for (int v = 0; v < kQV; ++v) mx[v] = vload(S + v * kW);
    for (int64_t r = 1; r < kb; ++r)
      for (int v = 0; v < kQV; ++v) mx[v] = vmax(mx[v], vload(S + r * kQB + v * kW));
    for (int v = 0; v < kQV; ++v) {
      const vf m_new = first ? mx[v] : vmax(m[v], mx[v]);
      if (!first) mx[v] = vexp(vmul(vs, vsub(m[v], m_new)));  // now the correction c
      m[v] = m_new;
      sh[v] = vmul(vns, m_new);
      acc[0][v] = acc[1][v] = vzero();
    }
    // two rows at a time: 2 x kQV independent sums in flight
    int64_t r = 0;
    for (; r + 2 <= kb; r += 2)
#pragma GCC unroll 2
      for (int u = 0; u < 2; ++u)
#pragma GCC unroll 4
        for (int v = 0; v < kQV; ++v) {
          float* s = S + (r + u) * kQB + v * kW;
          const vf e = vexp(vfma(vload(s), vs, sh[v]));
          vstore(s, e);
          acc[u][v] = vadd(acc[u][v], e);
        }
    for (; r < kb; ++r)
      for (int v = 0; v < kQV; ++v) {
        float* s = S + r * kQB + v * kW;
        const vf e = vexp(vfma(vload(s), vs, sh[v]));
        vstore(s, e);
        acc[0][v] = vadd(acc[0][v], e);
      }
    for (int v = 0; v < kQV; ++v) {
      const vf sum = vadd(acc[0][v], acc[1][v]);
      l[v] = first ? sum : vfma(l[v], mx[v], sum);
    }
    if (first) {
      gemm<false>(vt + j0, Mp, S, kQB, O, kQB, p.D, kQB, kb);
    } else {
      for (int64_t d = 0; d < p.D; ++d)
        for (int v = 0; v < kQV; ++v) vstore(O + d * kQB + v * kW, vmul(vload(O + d * kQB + v * kW), mx[v]));
      gemm<true>(vt + j0, Mp, S, kQB, O, kQB, p.D, kQB, kb);
    }
  }
  alignas(64) float inv[kQB];
  for (int v = 0; v < kQV; ++v) vstore(inv + v * kW, vdiv(vset(1.0f), l[v]));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < p.D; ++d) o[i * p.son + d] = O[d * kQB + i] * inv[i];
}

void attention_t(const AttentionParams& p) {
  const int64_t Mp = round_up(p.M, kW), KB = p.key_block > 0 ? p.key_block : kKeyBlockT;
  const int64_t kp_size = p.M * p.D;  // then V^T, D * Mp
  run_tasks(
      p, kp_size + p.D * Mp, kQB, [&] { return std::make_unique<ScratchT>(p, KB); },
      [&](int64_t b, int64_t h, float* kv) { pack_head_t(p, Mp, b, h, kv, kv + kp_size); },
      [&](int64_t b, int64_t h, int64_t i0, int64_t rows, const float* kv, ScratchT& w) {
        query_block_t(p, Mp, KB, b, h, i0, rows, kv, kv + kp_size, w);
      });
}

}  // namespace

void attention(const AttentionParams& p) {
  if (p.B * p.H * p.N * p.D == 0 || p.M == 0) return;  // (M >= 1 is checked on the Python side)
  // Measured (AVX-512, 2 threads, B 2, H 8): the lanes layout wins at D 40 from 600 keys
  // (3.2 vs 3.5 ms; 4096: 122 vs 151 ms) and at D 32-80 from 4096 keys (D 64: 199 vs 224 ms),
  // loses on one key block (cross-attention, <= kWholeKV keys: 77 keys D 80 1.8 vs 1.2 ms) and
  // ties at D 64-160 on 1024 keys.
  const bool lanes = p.queries_in_lanes >= 0 ? p.queries_in_lanes == 1
                                             : p.M > kWholeKV && (p.D % kW != 0 || p.M > 2048);
  if (lanes) return attention_t(p);
  Shape s;
  s.Mp = round_up(p.M, kW);
  s.Dp = round_up(p.D, kW);
  s.KB = p.key_block > 0 ? p.key_block : (p.M <= kWholeKV ? p.M : kKeyBlock);
  if (s.KB < p.M) s.KB = round_up(s.KB, kW);  // key blocks after the first start on a vector
  s.lds = round_up(s.KB, kW);
  const int64_t kt_size = p.D * s.Mp;  // then V, M * Dp
  run_tasks(
      p, kt_size + p.M * s.Dp, kQueryBlock, [&] { return std::make_unique<Scratch>(p, s); },
      [&](int64_t b, int64_t h, float* kv) { pack_head(p, s, b, h, kv, kv + kt_size); },
      [&](int64_t b, int64_t h, int64_t i0, int64_t rows, const float* kv, Scratch& w) {
        query_block(p, s, b, h, i0, rows, kv, kv + kt_size, w);
      });
}

}  // namespace SDFAST_ISA
}  // namespace cpu
}  // namespace sdfast
