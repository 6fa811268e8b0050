// Register-blocked fp32 GEMM for the CPU kernels (attention's QK^T and PV, LoRA's rank-r
// update): C[m, n] (+)= A[m, k] @ B[k, n], single-threaded, for small k or a B that stays in
// cache. A tile of MR rows x NV vectors of C is held in registers over the whole k loop: per
// step NV vector loads of B and MR broadcasts of A feed MR * NV FMAs.
//
// Layouts: A[r, p] at A[r * lda + p] (any row stride, unit column stride); B row p at
// B + p * ldb with n rounded up to whole vectors readable (packed, zero-padded); C row r at
// C + r * ldc (accumulating: the added values are read from S, row stride lds, which gemm
// passes as C itself). Only C's last vector of a row may be partial: `last` (1..kW) lanes are read and
// written there, so C can be a caller's tensor. With a row scale rs, row r of the product is
// multiplied by rs[r] before it is stored (or added).
#pragma once
#include "simd.h"

namespace sdfast {
namespace cpu {
namespace SDFAST_ISA {

// Rows per tile for NV vectors: MR * NV accumulators + NV B vectors + 1 broadcast fit in
// the register file (AVX2 16: NV 2 -> 6 rows; AVX-512 32: NV 4 -> 6, NV 5 -> 5, NV 3 -> 8).
template <int NV>
constexpr int tile_rows() {
  return (kRegs - 1 - NV) / NV > 8 ? 8 : (kRegs - 1 - NV) / NV;
}

template <int MR, int NV, bool kAcc, bool kStream = false>
inline void gemm_tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                      int64_t k, int64_t last, const float* rs, const float* S, int64_t lds) {
  // Fully unrolled so acc stays in registers (GCC spills it otherwise).
  vf acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
  for (int64_t p = 0; p < k; ++p) {
    vf b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = vload(B + p * ldb + v * kW);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vf a = vbcast(A + r * lda + p);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(a, b[v], acc[r][v]);
    }
  }
  if (rs) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vf scale = vbcast(rs + r);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vmul(acc[r][v], scale);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
    const float* s = S + r * lds;
#pragma GCC unroll 8
    for (int v = 0; v < NV - 1; ++v)
      vstore_or_stream<kStream>(c + v * kW, kAcc ? vadd(acc[r][v], vload(s + v * kW)) : acc[r][v]);
    float* cl = c + (NV - 1) * kW;
    const float* sl = s + (NV - 1) * kW;
    if (last == kW) {
      vstore_or_stream<kStream>(cl, kAcc ? vadd(acc[r][NV - 1], vload(sl)) : acc[r][NV - 1]);
    } else {
      vstore_n(cl, kAcc ? vadd(acc[r][NV - 1], vload_n(sl, last)) : acc[r][NV - 1], last);
    }
  }
}

// All m rows of one column group of NV vectors: tiles of MR rows, then one smaller tile.
template <int MR, int NV, bool kAcc, bool kStream = false>
inline void gemm_rows(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                      int64_t m, int64_t k, int64_t last, const float* rs, const float* S, int64_t lds) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR)
    gemm_tile<MR, NV, kAcc, kStream>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, k, last, rs ? rs + i : nullptr,
                            S + i * lds, lds);
  if constexpr (MR > 1) {
    if (i < m)
      gemm_rows<MR - 1, NV, kAcc, kStream>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, m - i, k, last,
                                  rs ? rs + i : nullptr, S + i * lds, lds);
  }
}

template <int NV, bool kAcc, bool kStream = false>
inline void gemm_group(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                       int64_t m, int64_t k, int64_t last, const float* rs, const float* S, int64_t lds) {
  gemm_rows<tile_rows<NV>(), NV, kAcc, kStream>(A, lda, B, ldb, C, ldc, m, k, last, rs, S, lds);
}

// The vectors per column group for a row of nvec vectors: AVX2 pairs (6 x 2 tiles); AVX-512
// the widest of 5, 4, 3 that divides nvec (5 x 5, 6 x 4, 8 x 3 tiles), else 4.
inline int group_vectors(int64_t nvec) {
  if (kRegs < 32) return 2;
  if (nvec % 5 == 0) return 5;
  if (nvec % 4 == 0) return 4;
  if (nvec % 3 == 0) return 3;
  return 4;
}

template <bool kAcc, bool kStream = false>
inline void gemm_cols(int nv, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, int64_t m, int64_t k, int64_t last, const float* rs, const float* S,
                      int64_t lds) {
  switch (nv) {
    case 1: gemm_group<1, kAcc, kStream>(A, lda, B, ldb, C, ldc, m, k, last, rs, S, lds); break;
    case 2: gemm_group<2, kAcc, kStream>(A, lda, B, ldb, C, ldc, m, k, last, rs, S, lds); break;
    case 3: gemm_group<3, kAcc, kStream>(A, lda, B, ldb, C, ldc, m, k, last, rs, S, lds); break;
    case 4: gemm_group<4, kAcc, kStream>(A, lda, B, ldb, C, ldc, m, k, last, rs, S, lds); break;
    default: gemm_group<5, kAcc, kStream>(A, lda, B, ldb, C, ldc, m, k, last, rs, S, lds); break;
  }
}

// C[m, n] (+)= (A[m, k] @ B[k, n]) * rs[m] (rs may be null), n >= 1 columns (B readable to whole
// vectors). Column groups outer, row tiles inner: a group's B panel is reused by every tile.
// (Splitting k so that the panel stays in L1 measured no faster for k = 160.)
template <bool kAcc>
inline void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t m,
                 int64_t n, int64_t k, const float* rs = nullptr) {
  const int64_t nvec = (n + kW - 1) / kW, last = n - (nvec - 1) * kW;
  const int nv = group_vectors(nvec);
  for (int64_t v = 0; v < nvec;) {
    const int g = static_cast<int>(imin(nv, nvec - v));
    gemm_cols<kAcc>(g, A, lda, B + v * kW, ldb, C + v * kW, ldc, m, k, v + g == nvec ? last : kW, rs, C + v * kW,
                    ldc);
    v += g;
  }
}

// As gemm, but row tiles outer and column groups inner, so each row of C is streamed left to
// right: for a C that comes from memory once (LoRA's weight) rather than from cache. With kAcc
// the product is added to S[m, n] (row stride lds; S == C in place, or a source that C
// receives, as a copy would, in the same pass).
template <bool kAcc, bool kStream = false>
inline void gemm_streamed(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                          int64_t m, int64_t n, int64_t k, const float* S, int64_t lds) {
  constexpr int nv = kRegs < 32 ? 2 : 4, mr = tile_rows<nv>();
  const int64_t nvec = (n + kW - 1) / kW, last = n - (nvec - 1) * kW;
  for (int64_t i = 0; i < m; i += mr) {
    const int64_t rows = imin(mr, m - i);
    for (int64_t v = 0; v < nvec; v += nv) {
      const int g = static_cast<int>(imin(nv, nvec - v));
      gemm_cols<kAcc, kStream>(g, A + i * lda, lda, B + v * kW, ldb, C + i * ldc + v * kW, ldc, rows, k,
                      v + g == nvec ? last : kW, nullptr, S + i * lds + v * kW, lds);
    }
  }
}

}  // namespace SDFAST_ISA
}  // namespace cpu
}  // namespace sdfast
