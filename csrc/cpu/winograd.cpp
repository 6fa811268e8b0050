// 3x3 convolution, stride 1, zero padding 1, fp32, channels-last, by Winograd F(4x4, 3x3).
//
// Each 4x4 block of outputs (a "tile") comes from the 6x6 input patch around it:
//   Y = A^T [ sum_i (G g_oi G^T) (.) (B^T d_i B) ] A          ((.) elementwise over 6x6)
// with the Toom-Cook matrices of the points 0, 1/2, -1/2, 2, -2 and infinity:
//   B^T = [1  0   -17/4  0    1  0]   G = [ 1      0      0   ]   A^T = [1 1    1    1  1 0]
//         [0 -2   -4     1/2  1  0]       [-8/15  -4/15  -2/15]         [0 1/2 -1/2  2 -2 0]
//         [0  2   -4    -1/2  1  0]       [-8/15   4/15  -2/15]         [0 1/4  1/4  4  4 0]
//         [0 -1/2 -1/4   2    1  0]       [ 1/30   1/15   2/15]         [0 1/8 -1/8  8 -8 1]
//         [0  1/2 -1/4  -2    1  0]       [ 1/30  -1/15   2/15]
//         [0  1    0   -17/4  0  1]       [ 0      0      1   ]
// (B^T and A^T hold powers of two and 17/4, exact in binary). The 36 positions q of the 6x6
// transform are 36 independent GEMMs over the channels:
//   M[q][t][o] = sum_i V[q][t][i] U[q][i][o],   V = B^T d B (input),  U = G g G^T (weights):
// 36 multiplications per tile and channel pair against the direct convolution's 144. The points
// +-1/2, +-2 round about 2/3 as much as the usual +-1, +-2 (tests/test_conv.py bounds the error).
//
// Work: tasks of (a block of up to kTileBlock tiles, a block of kNB output channels), tile block
// major, handed out dynamically. A thread transforms its tile block's input, every input channel,
// into V (kept while its next task has the same tile block); then, per block of kKB input
// channels, it transforms that block of weights into U, runs the 36 GEMMs into M (gemm.h, M
// accumulated over the input blocks), and at the end transforms M into y (+ bias, + add).
// The weights are read as they are ([Cout, Cin, 3, 3], kW output channels gathered at a time)
// and transformed on the fly, never cached: a transformed copy is 4x the weights (36 values per
// 3x3 kernel), and streaming it from memory costs more than recomputing it from the 9.
#include <omp.h>

#include <atomic>

#include "gemm.h"
#include "isa_kernels.h"
#include "simd.h"

namespace sdfast {
namespace cpu {
namespace SDFAST_ISA {
namespace {

constexpr int kPos = 36;              // 6x6 transform positions
constexpr int64_t kNB = 64;           // output channels per task (U and M row width)
constexpr int64_t kKB = 64;           // input channels per weight-transform block
// Tiles per task at most. 48 against 64 measured 5-10% less CPU time where Cin >= 640 at 64x64
// (SD1.5's up blocks: 640 -> 320, 960 -> 320) and at the VAE's 512 channels, equal elsewhere.
constexpr int64_t kTileBlock = 48;
constexpr int64_t kMaxV = 1 << 21;    // floats of V per thread at most (8 MB)
// Buffers hold the 36 positions one after another; a position's stride is padded by a cache
// line so the 36 loads or stores of one transform do not all fall into one L1 set (the
// unpadded strides are multiples of 4 KB).
constexpr int64_t kPad = 16;
inline int64_t pos_stride(int64_t n) { return n + kPad; }

#if defined(__AVX512F__)
using vi = __m512i;
inline vi lane_offsets(int64_t stride) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(stride)));
}
// base[idx[l]] for the first n lanes, 0 in the others (which touch no memory)
inline vf gather_n(const float* base, vi idx, int64_t n) {
  return _mm512_mask_i32gather_ps(vzero(), lanes(n), idx, base, 4);
}
#else
using vi = __m256i;
inline vi lane_offsets(int64_t stride) {
  return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(stride)));
}
inline vf gather_n(const float* base, vi idx, int64_t n) {
  return _mm256_mask_i32gather_ps(vzero(), base, idx, _mm256_castsi256_ps(lanes(n)), 4);
}
#endif

inline vf load_n(const float* p, int64_t n) { return n == kW ? vload(p) : vload_n(p, n); }
inline void store_n(float* p, vf v, int64_t n) {
  if (n == kW) {
    vstore(p, v);
  } else {
    vstore_n(p, v, n);
  }
}

// r = B^T d for one column d[0..5] (d[k * s])
inline void bt6(const vf* d, int s, vf* r, int rs) {
  const vf a = vfnma(vset(4.0f), d[2 * s], d[4 * s]);                   // d4 - 4 d2
  const vf b = vfnma(vset(2.0f), d[1 * s], vmul(vset(0.5f), d[3 * s]));  // d3 / 2 - 2 d1
  const vf c = vfnma(vset(0.25f), d[2 * s], d[4 * s]);                  // d4 - d2 / 4
  const vf e = vfnma(vset(0.5f), d[1 * s], vmul(vset(2.0f), d[3 * s]));  // 2 d3 - d1 / 2
  r[0] = vfnma(vset(4.25f), d[2 * s], vadd(d[0], d[4 * s]));
  r[1 * rs] = vadd(a, b);
  r[2 * rs] = vsub(a, b);
  r[3 * rs] = vadd(c, e);
  r[4 * rs] = vsub(c, e);
  r[5 * rs] = vfnma(vset(4.25f), d[3 * s], vadd(d[1 * s], d[5 * s]));
}

// r = G g for one column g[0..2] (g[k * s])
inline void g6(const vf* g, int s, vf* r, int rs) {
  const vf p = vfma(vset(0.25f), g[2 * s], g[0]);    // g0 + g2 / 4
  const vf q = vmul(vset(0.5f), g[1 * s]);           // g1 / 2
  const vf u = vfma(vset(4.0f), g[2 * s], g[0]);     // g0 + 4 g2
  const vf v = vadd(g[1 * s], g[1 * s]);             // 2 g1
  r[0] = g[0];
  r[1 * rs] = vmul(vset(-8.0f / 15.0f), vadd(p, q));
  r[2 * rs] = vmul(vset(-8.0f / 15.0f), vsub(p, q));
  r[3 * rs] = vmul(vset(1.0f / 30.0f), vadd(u, v));
  r[4 * rs] = vmul(vset(1.0f / 30.0f), vsub(u, v));
  r[5 * rs] = g[2 * s];
}

// r = A^T m for one column m[0..5] (m[k * s])
inline void at6(const vf* m, int s, vf* r, int rs) {
  const vf s1 = vadd(m[1 * s], m[2 * s]), d1 = vsub(m[1 * s], m[2 * s]);
  const vf s2 = vadd(m[3 * s], m[4 * s]), d2 = vsub(m[3 * s], m[4 * s]);
  r[0] = vadd(vadd(m[0], s1), s2);
  r[1 * rs] = vfma(vset(2.0f), d2, vmul(vset(0.5f), d1));
  r[2 * rs] = vfma(vset(4.0f), s2, vmul(vset(0.25f), s1));
  r[3 * rs] = vadd(vfma(vset(8.0f), d2, vmul(vset(0.125f), d1)), m[5 * s]);
}

struct Tiles {
  int64_t th, tw;  // tiles per column and per row of an image
  // (batch entry, top row, left column) of the 4x4 output block of tile t
  void at(int64_t t, int64_t& b, int64_t& h, int64_t& w) const {
    b = t / (th * tw);
    const int64_t r = t % (th * tw);
    h = (r / tw) * 4;
    w = (r % tw) * 4;
  }
};

// V[q][t][i] (row stride Cin, position stride pos_stride(tb * Cin)) of tiles [t0, t0 + tb), every channel.
void input_transform(const Conv3x3Params& p, const Tiles& tiles, int64_t t0, int64_t tb, float* V) {
  const int64_t vs = pos_stride(tb * p.Cin);
  for (int64_t t = 0; t < tb; ++t) {
    int64_t b, h0, w0;
    tiles.at(t0 + t, b, h0, w0);
    h0 -= 1;
    w0 -= 1;
    const float* xb = p.x + b * p.sxb;
    for (int64_t c = 0; c < p.Cin; c += kW) {
      const int64_t n = imin(kW, p.Cin - c);
      vf d[36], r[36];
      for (int k = 0; k < 6; ++k) {
        const int64_t h = h0 + k;
        const bool row_in = h >= 0 && h < p.H;
        for (int l = 0; l < 6; ++l) {
          const int64_t w = w0 + l;
          d[k * 6 + l] = row_in && w >= 0 && w < p.W ? load_n(xb + h * p.sxh + w * p.sxw + c, n) : vzero();
        }
      }
      for (int l = 0; l < 6; ++l) bt6(d + l, 6, r + l, 6);  // columns: r = B^T d
      for (int k = 0; k < 6; ++k) bt6(r + k * 6, 1, d + k * 6, 1);  // rows: d = r B
      float* v = V + t * p.Cin + c;
      for (int q = 0; q < kPos; ++q) store_n(v + q * vs, d[q], n);
    }
  }
}

// U[q][i - i0][o - o0] (row stride kNB, position stride pos_stride(kKB * kNB)) for the output channels
// [o0, o0 + nb) and input channels [i0, i0 + kb); lanes past nb in the last vector are 0.
void weight_transform(const Conv3x3Params& p, int64_t o0, int64_t nb, int64_t i0, int64_t kb, float* U) {
  const vi idx = lane_offsets(p.Cin * 9);
  const int64_t us = pos_stride(kKB * kNB);
  for (int64_t v = 0; v < nb; v += kW) {
    const int64_t n = imin(kW, nb - v);
    const float* wv = p.weight + ((o0 + v) * p.Cin + i0) * 9;
    for (int64_t i = 0; i < kb; ++i) {
      vf g[9], t[18], u[36];
      for (int k = 0; k < 9; ++k) g[k] = gather_n(wv + i * 9 + k, idx, n);
      for (int c = 0; c < 3; ++c) g6(g + c, 3, t + c, 3);       // columns: t = G g  (6x3)
      for (int r = 0; r < 6; ++r) g6(t + r * 3, 1, u + r * 6, 1);  // rows: u = t G^T (6x6)
      float* dst = U + i * kNB + v;
      for (int q = 0; q < kPos; ++q) vstore(dst + q * us, u[q]);
    }
  }
}

// y (+ bias, + add) for tiles [t0, t0 + tb) and output channels [o0, o0 + nb) from
// M[q][t][o - o0] (row stride kNB, position stride pos_stride(tb * kNB)).
void output_transform(const Conv3x3Params& p, const Tiles& tiles, int64_t t0, int64_t tb, int64_t o0,
                      int64_t nb, const float* M) {
  const int64_t ms = pos_stride(tb * kNB);
  for (int64_t t = 0; t < tb; ++t) {
    int64_t b, h0, w0;
    tiles.at(t0 + t, b, h0, w0);
    const int64_t rows = imin(4, p.H - h0), cols = imin(4, p.W - w0);
    for (int64_t v = 0; v < nb; v += kW) {
      const int64_t n = imin(kW, nb - v), o = o0 + v;
      vf m[36], r[24], y[16];
      for (int q = 0; q < kPos; ++q) m[q] = vload(M + q * ms + t * kNB + v);
      for (int l = 0; l < 6; ++l) at6(m + l, 6, r + l, 6);      // columns: r = A^T m (4x6)
      for (int k = 0; k < 4; ++k) at6(r + k * 6, 1, y + k * 4, 1);  // rows: y = r A (4x4)
      const vf bias = p.bias ? load_n(p.bias + o, n) : vzero();
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) {
          vf out = vadd(y[i * 4 + j], bias);
          if (p.add) out = vadd(out, load_n(p.add + b * p.sab + (h0 + i) * p.sah + (w0 + j) * p.saw + o, n));
          store_n(p.y + b * p.syb + (h0 + i) * p.syh + (w0 + j) * p.syw + o, out, n);
        }
    }
  }
}

// Per-thread buffers, kept between calls (OpenMP threads persist): no page faults per call.
struct Scratch {
  Buf<float> V, U, M;
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

}  // namespace

void conv3x3_winograd(const Conv3x3Params& p) {
  const Tiles tiles{(p.H + 3) / 4, (p.W + 3) / 4};
  const int64_t T = p.B * tiles.th * tiles.tw;
  if (T == 0 || p.Cout == 0 || p.Cin == 0) return;
  const int64_t tb_max = imax(1, imin(kTileBlock, kMaxV / (kPos * p.Cin)));
  const int64_t n_t = (T + tb_max - 1) / tb_max;
  const int64_t tb_size = (T + n_t - 1) / n_t;  // even blocks
  const int64_t n_co = (p.Cout + kNB - 1) / kNB;
  const int64_t tasks = n_t * n_co;
  std::atomic<int64_t> counter{0};
#pragma omp parallel
  {
    Scratch& s = scratch();
    s.V.reserve(kPos * pos_stride(tb_size * p.Cin));
    s.U.reserve(kPos * pos_stride(kKB * kNB));
    s.M.reserve(kPos * pos_stride(tb_size * kNB));
    int64_t have = -1;  // the tile block s.V holds
    for_each_task_ahead(counter, tasks, [&](int64_t task, int64_t) {
      const int64_t tblk = task / n_co, o0 = (task % n_co) * kNB;
      const int64_t t0 = tblk * tb_size, tb = imin(tb_size, T - t0), nb = imin(kNB, p.Cout - o0);
      if (tblk != have) {
        input_transform(p, tiles, t0, tb, s.V.data());
        have = tblk;
      }
      for (int64_t i0 = 0; i0 < p.Cin; i0 += kKB) {
        const int64_t kb = imin(kKB, p.Cin - i0);
        weight_transform(p, o0, nb, i0, kb, s.U.data());
        for (int q = 0; q < kPos; ++q) {
          const float* A = s.V.data() + q * pos_stride(tb * p.Cin) + i0;
          const float* B = s.U.data() + q * pos_stride(kKB * kNB);
          float* C = s.M.data() + q * pos_stride(tb * kNB);
          if (i0 == 0) {
            gemm<false>(A, p.Cin, B, kNB, C, kNB, tb, nb, kb);
          } else {
            gemm<true>(A, p.Cin, B, kNB, C, kNB, tb, nb, kb);
          }
        }
      }
      output_transform(p, tiles, t0, tb, o0, nb, s.M.data());
    });
  }
}

}  // namespace SDFAST_ISA
}  // namespace cpu
}  // namespace sdfast
