// Flash attention, simple and exact: a block of kWarps warps owns kWarps query rows of one
// (batch, head); K/V stream through shared memory in tiles of 32 keys. Lane j scores key j of
// the tile, the warp does the online softmax (running max m, sum l, rescale alpha = e^(m - m')),
// and lane t accumulates output dims t, t + 32, ... in fp32. Works for any M (self- and
// cross-attention alike) and any D <= kMaxHeadDim.
#include "common.cuh"
#include "kernels.h"

namespace sdfast_cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kTile = 32;
constexpr int kMaxPerLane = (kMaxHeadDim + 31) / 32;

struct AttnParams {
  int64_t H, N, M, D;
  int64_t qs[3], ks[3], vs[3], os[3];  // (batch, head, row) strides
  float scale_log2;                    // log2(e) / sqrt(D)
};

template <typename T>
__global__ void attention_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, T* __restrict__ o, AttnParams p) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(p.D), ld = D + 1;  // +1: no bank conflicts on key rows
  float* ks = smem;                                 // [kTile, D + 1]
  float* vs = ks + kTile * ld;                      // [kTile, D]
  float* qs = vs + kTile * D;                       // [kWarps, D]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool valid = row < p.N;
  const T* kb = k + b * p.ks[0] + h * p.ks[1];
  const T* vb = v + b * p.vs[0] + h * p.vs[1];
  float* qw = qs + warp * D;
  for (int d = lane; d < D; d += 32)
    qw[d] = valid ? to_f32(q[b * p.qs[0] + h * p.qs[1] + row * p.qs[2] + d]) * p.scale_log2 : 0.f;
  float acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) acc[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int64_t n0 = 0; n0 < p.M; n0 += kTile) {
    const int tile = p.M - n0 < kTile ? static_cast<int>(p.M - n0) : kTile;
    __syncthreads();
    for (int e = threadIdx.x; e < tile * D; e += kWarps * 32) {
      const int j = e / D, d = e % D;
      ks[j * ld + d] = to_f32(kb[(n0 + j) * p.ks[2] + d]);
      vs[j * D + d] = to_f32(vb[(n0 + j) * p.vs[2] + d]);
    }
    __syncthreads();
    float s = -INFINITY;
    if (lane < tile) {
      s = 0.f;
      for (int d = 0; d < D; ++d) s += qw[d] * ks[lane * ld + d];
    }
    float m_tile = s;
    for (int off = 16; off > 0; off >>= 1) m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, off));
    const float m_new = fmaxf(m, m_tile);
    const float alpha = exp2f(m - m_new);
    const float pj = lane < tile ? exp2f(s - m_new) : 0.f;
    float psum = pj;
    for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
    l = l * alpha + psum;
    m = m_new;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) acc[i] *= alpha;
    for (int j = 0; j < tile; ++j) {
      const float pb = __shfl_sync(0xffffffffu, pj, j);
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) acc[i] += pb * vs[j * D + d];
      }
    }
  }
  if (!valid) return;
  T* ob = o + b * p.os[0] + h * p.os[1] + row * p.os[2];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < D) ob[d] = from_f32<T>(acc[i] / l);
  }
}

}  // namespace

void attention(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o, int64_t B,
               int64_t H, int64_t N, int64_t M, int64_t D, const int64_t* q_strides,
               const int64_t* k_strides, const int64_t* v_strides, const int64_t* o_strides,
               int dtype, std::uintptr_t stream) {
  if (D <= 0 || D > kMaxHeadDim) throw std::invalid_argument("attention: head dim out of range");
  if (M <= 0) throw std::invalid_argument("attention: needs at least one key");
  if (B * H > 65535) throw std::invalid_argument("attention: batch * heads > 65535");
  if (B * H * N == 0) return;
  AttnParams p{H, N, M, D, {}, {}, {}, {}, 1.4426950408889634f / sqrtf(static_cast<float>(D))};
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q_strides[i]; p.ks[i] = k_strides[i]; p.vs[i] = v_strides[i]; p.os[i] = o_strides[i];
  }
  const size_t smem = sizeof(float) * (kTile * (D + 1) + kTile * D + kWarps * D);
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps), static_cast<unsigned>(B * H));
  SDFAST_DISPATCH_DTYPE(static_cast<DType>(dtype), T, {
    attention_kernel<T><<<grid, kWarps * 32, smem, as_stream(stream)>>>(
        reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v),
        reinterpret_cast<T*>(o), p);
  });
  check_launch("sdfast_cuda::attention");
}

}  // namespace sdfast_cuda
