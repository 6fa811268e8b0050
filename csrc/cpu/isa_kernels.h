// The kernels of each instruction set the library is built for (csrc/cpu/*.cpp compiled once
// per ISA, see simd.h); dispatch.cpp picks one set at run time.
#pragma once
#include "kernels.h"

namespace sdfast {
namespace cpu {
namespace avx2 {
void group_norm(const GroupNormParams& p);
void attention(const AttentionParams& p);
void lora_merge(const LoraMergeParams* layers, int64_t n_layers);
void conv3x3_winograd(const Conv3x3Params& p);
}  // namespace avx2
namespace avx512 {
void group_norm(const GroupNormParams& p);
void attention(const AttentionParams& p);
void lora_merge(const LoraMergeParams* layers, int64_t n_layers);
void conv3x3_winograd(const Conv3x3Params& p);
}  // namespace avx512
}  // namespace cpu
}  // namespace sdfast
