// In-place LoRA merge w[o, i] += sum_r up[o, r] * scale[r] * down[r, i]: one thread per weight
// element, fp32 products and accumulation, one rounding into the weight's dtype.
#include "common.cuh"
#include "kernels.h"

namespace sdfast_cuda {
namespace {

template <typename T>
__global__ void lora_merge_kernel(T* __restrict__ w, const float* __restrict__ up,
                                  const float* __restrict__ down, const float* __restrict__ scale,
                                  int64_t O, int64_t I, int64_t R, int64_t stride_w) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t o = blockIdx.y;
  if (i >= I || o >= O) return;
  float acc = 0.f;
  for (int64_t r = 0; r < R; ++r) acc += up[o * R + r] * scale[r] * down[r * I + i];
  T* wp = w + o * stride_w + i;
  *wp = from_f32<T>(to_f32(*wp) + acc);
}

}  // namespace

void lora_merge(std::uintptr_t w, std::uintptr_t up, std::uintptr_t down, std::uintptr_t scale,
                int64_t O, int64_t I, int64_t R, int64_t stride_w, int dtype,
                std::uintptr_t stream) {
  if (O * I == 0 || R == 0) return;
  if (O > 65535) throw std::invalid_argument("lora_merge: more than 65535 output rows");
  const dim3 grid(static_cast<unsigned>((I + 255) / 256), static_cast<unsigned>(O));
  SDFAST_DISPATCH_DTYPE(static_cast<DType>(dtype), T, {
    lora_merge_kernel<T><<<grid, 256, 0, as_stream(stream)>>>(
        reinterpret_cast<T*>(w), reinterpret_cast<const float*>(up),
        reinterpret_cast<const float*>(down), reinterpret_cast<const float*>(scale), O, I, R,
        stride_w);
  });
  check_launch("sdfast_cuda::lora_merge");
}

}  // namespace sdfast_cuda
