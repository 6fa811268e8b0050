// GroupNorm (+ per-channel add before, + SiLU after): one block per (batch, group), three passes
// (mean, variance around the mean, normalise and store), fp32 accumulation.
#include "common.cuh"
#include "kernels.h"

namespace sdfast_cuda {
namespace {

constexpr int kThreads = 256;

__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

struct GNParams {
  int64_t C, S, G, stride_b, stride_c, stride_s, add_stride_b, add_stride_c;
  float eps;
  bool has_add, silu;
};

// Element e of a group -> (channel in group, spatial index), the fastest-moving axis first so
// that consecutive threads read consecutive addresses in either layout.
__device__ __forceinline__ void split(int64_t e, int64_t cpg, int64_t S, bool c_fast, int64_t& c,
                                      int64_t& s) {
  if (c_fast) { c = e % cpg; s = e / cpg; } else { c = e / S; s = e % S; }
}

template <typename T>
__global__ void group_norm_kernel(const T* __restrict__ x, T* __restrict__ y,
                                  const T* __restrict__ w, const T* __restrict__ bias,
                                  const T* __restrict__ add, GNParams p) {
  __shared__ float shared[kThreads / 32];
  const int64_t b = blockIdx.x / p.G, g = blockIdx.x % p.G, cpg = p.C / p.G;
  const int64_t n = cpg * p.S;
  const bool c_fast = p.stride_c < p.stride_s;
  const int64_t base = b * p.stride_b + g * cpg * p.stride_c;
  auto load = [&](int64_t c, int64_t s) {
    float v = to_f32(x[base + c * p.stride_c + s * p.stride_s]);
    if (p.has_add) v += to_f32(add[b * p.add_stride_b + (g * cpg + c) * p.add_stride_c]);
    return v;
  };
  float acc = 0.f;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    int64_t c, s;
    split(e, cpg, p.S, c_fast, c, s);
    acc += load(c, s);
  }
  const float mean = block_sum(acc, shared) / static_cast<float>(n);
  acc = 0.f;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    int64_t c, s;
    split(e, cpg, p.S, c_fast, c, s);
    const float d = load(c, s) - mean;
    acc += d * d;
  }
  const float rstd = rsqrtf(block_sum(acc, shared) / static_cast<float>(n) + p.eps);
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    int64_t c, s;
    split(e, cpg, p.S, c_fast, c, s);
    float v = (load(c, s) - mean) * rstd * to_f32(w[g * cpg + c]) + to_f32(bias[g * cpg + c]);
    if (p.silu) v = v / (1.f + __expf(-v));
    y[base + c * p.stride_c + s * p.stride_s] = from_f32<T>(v);
  }
}

}  // namespace

void group_norm(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias,
                std::uintptr_t add, int64_t B, int64_t C, int64_t S, int64_t G,
                int64_t stride_b, int64_t stride_c, int64_t stride_s, int64_t add_stride_b,
                int64_t add_stride_c, float eps, bool has_add, bool silu, int dtype,
                std::uintptr_t stream) {
  if (G <= 0 || C % G != 0) throw std::invalid_argument("group_norm: C must be divisible by G");
  if (B * G == 0 || S == 0) return;
  GNParams p{C, S, G, stride_b, stride_c, stride_s, add_stride_b, add_stride_c, eps, has_add, silu};
  SDFAST_DISPATCH_DTYPE(static_cast<DType>(dtype), T, {
    group_norm_kernel<T><<<static_cast<unsigned>(B * G), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<T*>(y), reinterpret_cast<const T*>(weight),
        reinterpret_cast<const T*>(bias), reinterpret_cast<const T*>(add), p);
  });
  check_launch("sdfast_cuda::group_norm");
}

}  // namespace sdfast_cuda
