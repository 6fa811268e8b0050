// The vector layer of sdfast's CPU kernels: one float vector `vf` of kW lanes for the ISA this
// translation unit is compiled for, and the few operations the kernels use on it.
//
//   avx2    __m256, kW = 8,  16 vector registers   (-mavx2 -mfma)
//   avx512  __m512, kW = 16, 32 vector registers   (-mavx512f -mavx512dq -mavx512vl -mavx512bw)
//
// CMakeLists.txt compiles every kernel source once per ISA with -DSDFAST_ISA=<name>; everything
// here and in the kernels lives in namespace sdfast::cpu::<name>, so the two builds of one
// kernel never share a symbol (dispatch.cpp picks one at run time). For the same reason the
// kernels keep std:: templates that compile to loops (vector, fill, copy) out of these files:
// an out-of-line copy compiled with AVX-512 could be the one the linker keeps for everybody.
#pragma once
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <new>

#ifndef SDFAST_ISA
#error "csrc/cpu kernels are compiled with -DSDFAST_ISA=avx2 or avx512 (see CMakeLists.txt)"
#endif

namespace sdfast {
namespace cpu {
namespace SDFAST_ISA {

#if defined(__AVX512F__)
using vf = __m512;
constexpr int kW = 16;
constexpr int kRegs = 32;

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline __mmask16 lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
// The first n (0..kW) lanes; the others read as 0 (or fill) and are never touched in memory.
inline vf vload_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
inline void vstore_n(float* p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
inline vf vkeep_n(vf v, int64_t n) { return _mm512_maskz_mov_ps(lanes(n), v); }  // others 0
inline vf vload_n(const float* p, int64_t n, float fill) { return _mm512_mask_loadu_ps(vset(fill), lanes(n), p); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline vf vneg(vf a) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN))); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using vf = __m256;
constexpr int kW = 8;
constexpr int kRegs = 16;

inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vf vload_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes(n)); }
inline void vstore_n(float* p, vf v, int64_t n) { _mm256_maskstore_ps(p, lanes(n), v); }
inline vf vkeep_n(vf v, int64_t n) { return _mm256_and_ps(v, _mm256_castsi256_ps(lanes(n))); }
inline vf vload_n(const float* p, int64_t n, float fill) {
  const __m256i m = lanes(n);
  return _mm256_blendv_ps(vset(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vf vneg(vf a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vhmax(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
// p * 2^n, n held in the low bits of nf = n + 1.5 * 2^23 (see vexp); valid while the result
// is a normal float.
inline vf vscale2n(vf p, vf nf) {
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(nf), 23)));
}
#else
#error "csrc/cpu kernels need AVX2 + FMA or AVX-512"
#endif

inline vf vbcast(const float* p) { return vset(*p); }

// A whole-vector store, non-temporal (kStream: p aligned to the vector; for output that is not
// read again soon, so it skips the read-for-ownership of its cache lines; an _mm_sfence
// orders it before the data is handed on) or plain.
template <bool kStream>
inline void vstore_or_stream(float* p, vf v) {
  if constexpr (kStream) {
#if defined(__AVX512F__)
    _mm512_stream_ps(p, v);
#else
    _mm256_stream_ps(p, v);
#endif
  } else {
    vstore(p, v);
  }
}

// exp(x) to ~1 ulp: x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (two-step
// Cody-Waite), e^r = 1 + r q(r) with q a degree-5 near-minimax fit (1.7e-8 relative), times 2^n:
// AVX-512 scales with vscalefps (0 and inf where due); AVX2 takes n from the mantissa of
// x / ln2 + 1.5 * 2^23 and adds it to the exponent bits, so x is clamped to [-86.6, 88.3]
// first (below: ~2e-38, never 0; above: ~2e38).
inline vf vexp(vf x) {
#if defined(__AVX512F__)
  const vf n = _mm512_roundscale_ps(vmul(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  x = vmin(vmax(x, vset(-86.6f)), vset(88.3f));
  const vf magic = vset(12582912.0f);  // 1.5 * 2^23
  const vf nf = vfma(x, vset(1.44269504088896341f), magic);
  const vf n = vsub(nf, magic);
#endif
  vf r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  vf q = vset(1.3843649066984653e-3f);
  q = vfma(q, r, vset(8.374156430363655e-3f));
  q = vfma(q, r, vset(4.166800156235695e-2f));
  q = vfma(q, r, vset(1.6666431725025177e-1f));
  q = vfma(q, r, vset(4.999999403953552e-1f));
  q = vfma(q, r, vset(1.0f));
#if defined(__AVX512F__)
  return _mm512_scalef_ps(vfma(q, r, vset(1.0f)), n);
#else
  return vscale2n(vfma(q, r, vset(1.0f)), nf);
#endif
}

// silu(y) = y / (1 + e^-y); an exact division (it runs on its own unit beside the FMA ports:
// a reciprocal plus a Newton step measured slower).
inline vf vsilu(vf y) { return vdiv(y, vadd(vset(1.0f), vexp(vneg(y)))); }

// A buffer of n trivial T aligned to 64 bytes, uninitialised (raw operator new: no loop
// compiled here).
template <class T>
class Buf {
 public:
  Buf() = default;
  explicit Buf(int64_t n) { resize(n); }
  ~Buf() { release(); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  void resize(int64_t n) {
    release();
    p_ = static_cast<T*>(::operator new(static_cast<size_t>(n > 0 ? n : 1) * sizeof(T), std::align_val_t(64)));
    capacity_ = n;
  }
  // At least n elements, the old ones kept only when no new memory was needed: a buffer kept
  // between calls (thread_local) reuses its pages instead of faulting fresh ones in each call.
  void reserve(int64_t n) {
    if (n > capacity_) resize(n);
  }
  T* data() { return p_; }
  T& operator[](int64_t i) { return p_[i]; }

 private:
  void release() {
    if (p_) ::operator delete(p_, std::align_val_t(64));
    p_ = nullptr;
    capacity_ = 0;  // (a failed resize leaves an empty buffer that the next reserve refills)
  }
  T* p_ = nullptr;
  int64_t capacity_ = 0;
};

// Prefetch into L2 the lines of n floats at p.
inline void prefetch_l2(const float* p, int64_t n = 1) {
  for (int64_t i = 0; i < n; i += 16) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T1);
  if (n > 1) _mm_prefetch(reinterpret_cast<const char*>(p + n - 1), _MM_HINT_T1);
}

// Runs body(task, next) for tasks [0, n) over the threads of the enclosing OpenMP parallel
// region, handed out from a shared counter one ahead: `next` is the task this thread runs
// after this one (n or more when none), so the body can prefetch it. Load-balanced like
// schedule(dynamic, 1). Every thread of the region must call it with the same counter.
template <class F>
inline void for_each_task_ahead(std::atomic<int64_t>& counter, int64_t n, F&& body) {
  int64_t cur = counter.fetch_add(1);
  while (cur < n) {
    const int64_t next = counter.fetch_add(1);
    body(cur, next);
    cur = next;
  }
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// dst[0, n) = src[0, n) (memcpy: a library call, not a loop compiled here)
inline void copy_n(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); }
inline void zero_n(float* dst, int64_t n) { std::memset(dst, 0, static_cast<size_t>(n) * sizeof(float)); }

}  // namespace SDFAST_ISA
}  // namespace cpu
}  // namespace sdfast
