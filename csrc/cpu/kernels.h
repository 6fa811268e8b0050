// sdfast CPU kernels (fp32, OpenMP + AVX2, and AVX-512 where the CPU has it). Torch-free: raw
// pointers, sizes, element strides. All input checks live in sdfast/ops/cpu_backend.py; these
// functions trust their arguments.
#pragma once
#include <cstdint>

namespace sdfast {
namespace cpu {

// The instruction set the kernels below run with: "avx512" when the library was built with it
// and this CPU has AVX-512 F/DQ/BW/VL, else "avx2". The environment variable SDFAST_CPU_ISA
// (avx2 | avx512), read once, or set_isa() forces one; set_isa returns false, changing nothing,
// for a name that is not built or not supported here.
const char* isa();
bool set_isa(const char* name);
bool isa_available(const char* name);

// y[b, c, s] = act((x[b, c, s] + add[b, c] - mean[b, g]) * rstd[b, g] * weight[c] + bias[c])
// over G groups of C / G channels; act is SiLU when `silu`, else identity. Strides in elements:
// (sxb, sxc, sxs) for x, (syb, syc, sys) for y, (sab, sac) for add. Either sxs == 1 (NCHW,
// [B, C, N]) or sxc == 1 (channels-last); the same holds for y. `add`, `weight`, `bias` may be null.
struct GroupNormParams {
  const float* x; float* y;
  const float* weight; const float* bias; const float* add;
  int64_t B, C, S, G;
  int64_t sxb, sxc, sxs, syb, syc, sys, sab, sac;
  float eps; bool silu;
};
void group_norm(const GroupNormParams& p);

// o[b, h, i, :] = softmax_j(q[b, h, i, :] . k[b, h, j, :] * scale) @ v[b, h, :, :]
// q [B, H, N, D], k and v [B, H, M, D], o [B, H, N, D]; last-dimension stride 1 everywhere,
// other strides free. Keys are processed in blocks of `key_block` (M or less: 0 = automatic)
// with an online softmax; one block means the whole K/V of a head stays in cache.
struct AttentionParams {
  const float* q; const float* k; const float* v; float* o;
  int64_t B, H, N, M, D;
  int64_t sqb, sqh, sqn, skb, skh, skm, svb, svh, svm, sob, soh, son;
  float scale; int64_t key_block;  // scale > 0 (the running maxima are of the unscaled scores)
  // Layout of the score tiles: 0 queries as rows (keys along the vector lanes), 1 keys as rows
  // (queries along the lanes), -1 chosen by shape (csrc/cpu/attention.cpp).
  int64_t queries_in_lanes = -1;
};
void attention(const AttentionParams& p);

// W[o, i] += sum_l scale_l * sum_r up_l[o, r] * down_l[r, i], in fp32, one pass over W.
// W is [O, I] with row stride ldw and unit column stride; up_l [O, rank_l] row-major
// (row stride ups_ld[l], unit column stride); down_l [rank_l, I] with row stride downs_ld[l]
// and unit column stride. With a source `src` ([O, I], row stride lds, unit column stride, not
// overlapping W): W = src + the same sum, in the same one pass (a copy and a merge at once).
struct LoraMergeParams {
  float* w; int64_t O, I, ldw;
  int64_t n_lora;
  const float* const* ups; const int64_t* ups_ld;
  const float* const* downs; const int64_t* downs_ld;
  const int64_t* ranks; const float* scales;
  const float* src = nullptr; int64_t lds = 0;
};
void lora_merge(const LoraMergeParams& p);
// Several weights (each with its own LoRAs) merged in one parallel pass.
void lora_merge(const LoraMergeParams* layers, int64_t n_layers);

// y[b, h, w, o] = bias[o] + add[b, h, w, o] + sum_{i, kh, kw} x[b, h + kh - 1, w + kw - 1, i] *
// weight[o, i, kh, kw]: a 3x3 convolution, stride 1, zero padding 1, by Winograd F(4x4, 3x3)
// (csrc/cpu/winograd.cpp). x [B, H, W, Cin] and y, add [B, H, W, Cout] are channels-last
// (unit channel stride; element strides (b, h, w) given); weight is [Cout, Cin, 3, 3]
// contiguous, read as it is (transformed block by block on the fly). bias, add may be null.
struct Conv3x3Params {
  const float* x; const float* weight; const float* bias; const float* add; float* y;
  int64_t B, H, W, Cin, Cout;
  int64_t sxb, sxh, sxw, syb, syh, syw, sab, sah, saw;
};
void conv3x3_winograd(const Conv3x3Params& p);

}  // namespace cpu
}  // namespace sdfast
