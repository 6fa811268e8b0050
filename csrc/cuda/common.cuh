// Shared helpers for sdfast's torch-free CUDA kernels: dtype tags, fp32 load/store, dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sdfast_cuda {

// The dtype tag every entry point takes; matches sdfast/ops/cuda_backend.py.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

// Runtime dtype -> template type: the one switch every entry point uses.
#define SDFAST_DISPATCH_DTYPE(DTYPE, T, ...)                                  \
  switch (DTYPE) {                                                            \
    case ::sdfast_cuda::DType::F32: { using T = float; __VA_ARGS__; break; }   \
    case ::sdfast_cuda::DType::F16: { using T = __half; __VA_ARGS__; break; }  \
    case ::sdfast_cuda::DType::BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: throw std::invalid_argument("sdfast_cuda: unknown dtype tag");   \
  }

}  // namespace sdfast_cuda
