// Host entry points of sdfast's CUDA kernels. Torch-free: raw device pointers (as integers),
// sizes, element strides, a dtype tag (0 fp32, 1 fp16, 2 bf16) and a cudaStream_t as an integer.
#pragma once
#include <cstdint>

namespace sdfast_cuda {

// y = [silu]((x + add[b, c]) normalised over (C/G channels x S positions) * w[c] + bias[c]).
// x and y share strides (stride_b, stride_c, stride_s); add is [B, C] with strides (sab, sac).
void group_norm(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias,
                std::uintptr_t add, int64_t B, int64_t C, int64_t S, int64_t G,
                int64_t stride_b, int64_t stride_c, int64_t stride_s, int64_t add_stride_b,
                int64_t add_stride_c, float eps, bool has_add, bool silu, int dtype,
                std::uintptr_t stream);

// o = softmax(q k^T / sqrt(D)) v for q [B, H, N, D], k / v [B, H, M, D], o [B, H, N, D];
// strides are (batch, head, row) in elements, the last dim contiguous. D <= kMaxHeadDim.
constexpr int kMaxHeadDim = 160;
void attention(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o, int64_t B,
               int64_t H, int64_t N, int64_t M, int64_t D, const int64_t* q_strides,
               const int64_t* k_strides, const int64_t* v_strides, const int64_t* o_strides,
               int dtype, std::uintptr_t stream);

// w[o, i] += sum_r up[o, r] * scale[r] * down[r, i] with fp32 accumulation; w [O, I] (row stride
// stride_w, dtype tag), up fp32 [O, R] and down fp32 [R, I] contiguous, scale fp32 [R].
void lora_merge(std::uintptr_t w, std::uintptr_t up, std::uintptr_t down, std::uintptr_t scale,
                int64_t O, int64_t I, int64_t R, int64_t stride_w, int dtype,
                std::uintptr_t stream);

}  // namespace sdfast_cuda
