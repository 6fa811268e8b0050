// LoRA merge into weights, in place, fp32: W[o, i] += sum_l scale_l (up_l @ down_l)[o, i], for
// one weight or a list of weights (every layer a LoRA touches) in one OpenMP region; or from a
// source, W = src + the same sum (the first merge into a copy of an original weight: the copy
// and the merge in one pass).
//
// Per weight, all its LoRAs become one GEMM of rank R = sum_l rank_l: A = [scale_1 up_1 |
// scale_2 up_2 | ...] ([O, R]) and B = [down_1; down_2; ...] ([R, I]), packed in column
// blocks of kColBlock ([R, kColBlock] each, contiguous, zero-padded to whole vectors). The
// region first packs every weight's A and B (one weight per task), then runs tasks of
// kRowBlock rows x kColBlock columns of any weight: W is read and written once, streamed row
// by row through register tiles (gemm.h gemm_streamed), while the task's block of B stays in
// L1 (contiguous, so it spreads over every L1 set: a row stride of whole KB would not).
// Merging many small weights in one region spreads them over the threads with no per-layer
// dispatch.
#include <omp.h>

#include <cstdint>

#include "gemm.h"
#include "isa_kernels.h"
#include "simd.h"

namespace sdfast {
namespace cpu {
namespace SDFAST_ISA {
namespace {

constexpr int64_t kRowBlock = 48;   // a multiple of the tile heights 6 and 8
constexpr int64_t kColBlock = 1024;  // B block: 128 KB at rank 32 (L2); long W row runs stream best

struct Layout {
  int64_t R = 0, a_off = 0, b_off = 0, task0 = 0, col_blocks = 0;
};

void pack(const LoraMergeParams& p, const Layout& L, float* A, float* B) {
  for (int64_t l = 0, r0 = 0; l < p.n_lora; r0 += p.ranks[l], ++l) {
    const int64_t rank = p.ranks[l];
    const float scale = p.scales[l];
    for (int64_t o = 0; o < p.O; ++o) {
      const float* up = p.ups[l] + o * p.ups_ld[l];
      for (int64_t r = 0; r < rank; ++r) A[o * L.R + r0 + r] = scale * up[r];
    }
    for (int64_t r = 0; r < rank; ++r)
      for (int64_t cb = 0; cb < L.col_blocks; ++cb) {
        float* row = B + (cb * L.R + r0 + r) * kColBlock;
        const int64_t n = imin(kColBlock, p.I - cb * kColBlock);
        copy_n(p.downs[l] + r * p.downs_ld[l] + cb * kColBlock, n, row);
        zero_n(row + n, round_up(n, kW) - n);
      }
  }
}

}  // namespace

void lora_merge(const LoraMergeParams* layers, int64_t n_layers) {
  Buf<Layout> lay(n_layers);
  int64_t a_size = 0, b_size = 0, tasks = 0;
  for (int64_t n = 0; n < n_layers; ++n) {
    const LoraMergeParams& p = layers[n];
    Layout& L = lay[n];
    L = Layout();
    for (int64_t l = 0; l < p.n_lora; ++l) L.R += p.ranks[l];
    L.a_off = a_size;
    L.b_off = b_size;
    L.task0 = tasks;
    const bool empty = (L.R == 0 && !p.src) || p.O == 0 || p.I == 0;  // (R 0 from src: a copy)
    L.col_blocks = empty ? 0 : (p.I + kColBlock - 1) / kColBlock;
    a_size += p.O * L.R;
    b_size += L.col_blocks * L.R * kColBlock;
    tasks += empty ? 0 : (p.O + kRowBlock - 1) / kRowBlock * L.col_blocks;
  }
  if (tasks == 0) return;
  Buf<float> A(a_size), B(b_size);
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < n_layers; ++n) pack(layers[n], lay[n], A.data() + lay[n].a_off, B.data() + lay[n].b_off);
    int64_t n = 0;  // tasks come in layer order, so each thread's layer index only moves up
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      while (n + 1 < n_layers && lay[n + 1].task0 <= t) ++n;
      const LoraMergeParams& p = layers[n];
      const Layout& L = lay[n];
      const int64_t local = t - L.task0;
      const int64_t o0 = local / L.col_blocks * kRowBlock, cb = local % L.col_blocks, i0 = cb * kColBlock;
      const float* src = p.src ? p.src + o0 * p.lds + i0 : p.w + o0 * p.ldw + i0;
      const float *a = A.data() + L.a_off + o0 * L.R, *b = B.data() + L.b_off + cb * L.R * kColBlock;
      float* w = p.w + o0 * p.ldw + i0;
      const int64_t rows = imin(kRowBlock, p.O - o0), cols = imin(kColBlock, p.I - i0);
      // From a source, W is written and not read: stream it past the caches when aligned.
      const bool stream = p.src && reinterpret_cast<uintptr_t>(w) % (kW * sizeof(float)) == 0 && p.ldw % kW == 0;
      if (stream) gemm_streamed<true, true>(a, L.R, b, kColBlock, w, p.ldw, rows, cols, L.R, src, p.lds);
      else gemm_streamed<true>(a, L.R, b, kColBlock, w, p.ldw, rows, cols, L.R, src, p.src ? p.lds : p.ldw);
    }
    _mm_sfence();  // the streamed stores reach memory before the region ends
  }
}

}  // namespace SDFAST_ISA
}  // namespace cpu
}  // namespace sdfast
