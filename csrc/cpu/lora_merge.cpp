// LoRA merge into a weight, in place, fp32: W[o, i] += sum_l scale_l (up_l @ down_l)[o, i].
//
// All LoRAs become one GEMM of rank R = sum_l rank_l: A = [scale_1 up_1 | scale_2 up_2 | ...]
// ([O, R]) and B = [down_1; down_2; ...] ([R, I], packed to a row stride rounded up to 8).
// W is then read and written once, in tiles of 4 rows x 24 columns held in registers over
// the whole rank (common.h gemm with accumulate); OpenMP runs over blocks of W.
#include <omp.h>

#include <vector>

#include "common.h"
#include "kernels.h"

namespace sdfast {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 32;
constexpr int64_t kColBlock = 480;  // a multiple of 24 and of 8

}  // namespace

void lora_merge(const LoraMergeParams& p) {
  int64_t R = 0;
  for (int64_t l = 0; l < p.n_lora; ++l) R += p.ranks[l];
  if (R == 0 || p.O == 0 || p.I == 0) return;
  const int64_t Ip = round_up(p.I, 8);
  std::vector<float> A(p.O * R), Bp(R * Ip, 0.0f);
  for (int64_t l = 0, r0 = 0; l < p.n_lora; r0 += p.ranks[l], ++l) {
    const int64_t rank = p.ranks[l];
    for (int64_t o = 0; o < p.O; ++o)
      for (int64_t r = 0; r < rank; ++r) A[o * R + r0 + r] = p.scales[l] * p.ups[l][o * p.ups_ld[l] + r];
    for (int64_t r = 0; r < rank; ++r)
      std::copy(p.downs[l] + r * p.downs_ld[l], p.downs[l] + r * p.downs_ld[l] + p.I, &Bp[(r0 + r) * Ip]);
  }
  const int64_t nrb = (p.O + kRowBlock - 1) / kRowBlock, ncb = (p.I + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < nrb * ncb; ++t) {
    const int64_t o0 = (t / ncb) * kRowBlock, i0 = (t % ncb) * kColBlock;
    gemm(&A[o0 * R], R, &Bp[i0], Ip, p.w + o0 * p.ldw + i0, p.ldw, std::min(kRowBlock, p.O - o0),
         std::min(kColBlock, p.I - i0), R, true);
  }
}

}  // namespace cpu
}  // namespace sdfast
