// GroupNorm (+ optional per-(batch, channel) add before the norm, + optional SiLU), fp32.
//
// Statistics are sums of d = v - shift and d^2 (v = x + add[b, c], shift one value of the
// group or channel, so sum(d^2) - sum(d)^2 / n does not cancel), in fp32 vector partials
// flushed into double every kFlush vectors; then per channel y = act(x * a_c + t_c),
// a_c = rstd_g w_c, t_c = b_c + (add_c - mean_g) a_c.
//
// Rows contiguous per channel (NCHW, [B, C, N]): one task per (batch, group), x read from
// memory once: a thread normalises its current group from L2 (an SD1.5 group is 10-160 KB)
// in the same loop that sums its next group's rows from memory, so those loads overlap the
// SiLU arithmetic. The whole group shares one shift and one set of vector accumulators, so a
// channel of a few vectors (4x4 and 8x8 latents) costs no reduction of its own.
// Channels-last (and HW = 1): a group is strided over every row, and reading it strided
// wastes half the bandwidth, so two phases over contiguous chunks of rows instead: each
// thread sums its chunks into its own per-channel accumulators (shift_c: the channel's value
// in the entry's first row); then per group the threads' sums are combined (the Chan
// combination M2_g = sum_c M2_c + S sum_c (mean_c - mean_g)^2, add folded into mean_c); then
// each thread normalises its chunks, last read first (those are still in cache), in waves of
// batch entries sized for L2.
#include <omp.h>

#include <cmath>
#include <utility>

#include "isa_kernels.h"
#include "simd.h"

namespace sdfast {
namespace cpu {
namespace SDFAST_ISA {
namespace {

struct Moments {
  double mean, m2;  // mean and sum of squared deviations of one channel
};

constexpr int64_t kFlush = 64;  // vectors summed in fp32 before a flush into double

inline Moments finish(double shift, double s1, double s2, int64_t n) {
  const double m2 = s2 - s1 * s1 / n;
  return {shift + s1 / n, m2 > 0.0 ? m2 : 0.0};
}

template <bool kSilu>
inline vf act(vf y) { return kSilu ? vsilu(y) : y; }


// d1[c] += sum_s (x[s, c] - shift[c]), d2[c] += sum_s (x[s, c] - shift[c])^2 over `rows` rows of
// cn channels (row stride sxs); f: 2 * cn floats of scratch for the fp32 partials.
void rows_sums(const float* x, int64_t rows, int64_t sxs, int64_t cn, const float* shift, float* f, double* d1,
               double* d2) {
  float *f1 = f, *f2 = f + cn;
  const int64_t full = cn / kW * kW, left = cn - full;
  for (int64_t s0 = 0; s0 < rows; s0 += kFlush) {
    zero_n(f, 2 * cn);
    for (int64_t s = s0; s < imin(s0 + kFlush, rows); ++s) {
      const float* row = x + s * sxs;
      for (int64_t c = 0; c < full; c += kW) {
        const vf v = vsub(vload(row + c), vload(shift + c));
        vstore(f1 + c, vadd(vload(f1 + c), v));
        vstore(f2 + c, vfma(v, v, vload(f2 + c)));
      }
      if (left) {
        const vf v = vsub(vload_n(row + full, left), vload_n(shift + full, left));
        vstore_n(f1 + full, vadd(vload_n(f1 + full, left), v), left);
        vstore_n(f2 + full, vfma(v, v, vload_n(f2 + full, left)), left);
      }
    }
    for (int64_t c = 0; c < cn; ++c) {
      d1[c] += f1[c];
      d2[c] += f2[c];
    }
  }
}

// Per-channel affine (a, t) of the channels [c0, c0 + cg) of one group of batch entry b, whose
// values (x + add) have mean `mean` and sum of squared deviations m2.
void group_affine(const GroupNormParams& p, int64_t b, int64_t c0, int64_t cg, double mean, double m2, float* a,
                  float* t) {
  const double rstd = 1.0 / std::sqrt((m2 > 0.0 ? m2 : 0.0) / (static_cast<double>(p.S) * cg) + p.eps);
  for (int64_t c = 0; c < cg; ++c) {
    const double w = p.weight ? p.weight[c0 + c] : 1.0, bias = p.bias ? p.bias[c0 + c] : 0.0;
    const double add = p.add ? p.add[b * p.sab + (c0 + c) * p.sac] : 0.0;
    a[c] = static_cast<float>(rstd * w);
    t[c] = static_cast<float>(bias + (add - mean) * rstd * w);
  }
}

// The same from per-channel moments of x (the Chan combination, add folded into each mean).
void group_affine(const GroupNormParams& p, int64_t b, int64_t c0, int64_t cg, Moments* mom, float* a, float* t) {
  double mean = 0.0;
  for (int64_t c = 0; c < cg; ++c) {
    if (p.add) mom[c].mean += p.add[b * p.sab + (c0 + c) * p.sac];
    mean += mom[c].mean;
  }
  mean /= cg;
  double m2 = 0.0;
  for (int64_t c = 0; c < cg; ++c) {
    const double dev = mom[c].mean - mean;
    m2 += mom[c].m2 + p.S * dev * dev;
  }
  group_affine(p, b, c0, cg, mean, m2, a, t);
}

// y[i] = act(x[i] * a[i] + t[i]) over a contiguous row of n.
template <bool kSilu>
void affine_row(const float* x, float* y, int64_t n, const float* a, const float* t) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vstore(y + i, act<kSilu>(vfma(vload(x + i), vload(a + i), vload(t + i))));
  if (i < n) {
    const int64_t m = n - i;
    vstore_n(y + i, act<kSilu>(vfma(vload_n(x + i, m), vload_n(a + i, m), vload_n(t + i, m))), m);
  }
}

// Moments of one group, summed as d = x + off_c (off_c = add_c - shift, shift the group's first
// value): fp32 vector partials in two pairs (channels alternate between them), flushed into
// double every kFlush vectors; one horizontal reduction per flush, not per channel.
struct GroupSums {
  vf a1, a2, b1, b2;
  int64_t count;
  double s1, s2;
  void reset() {
    a1 = a2 = b1 = b2 = vzero();
    count = 0;
    s1 = s2 = 0.0;
  }
  void flush() {
    s1 += vsum(vadd(a1, b1));
    s2 += vsum(vadd(a2, b2));
    a1 = a2 = b1 = b2 = vzero();
    count = 0;
  }
};

// One pass over the cg channels (stride sxc / syc, S contiguous values each) of two groups:
// y = act(x * a_c + t_c) for the current one (kNorm) and the moments of the next one, xs, into
// g (kSum): its loads overlap the current group's arithmetic.
template <bool kNorm, bool kSum, bool kSilu>
void group_pass(const float* x, float* y, const float* a, const float* t, const float* xs, const float* off,
                int64_t cg, int64_t S, int64_t sxc, int64_t syc, GroupSums& g) {
  const int64_t full = S / kW * kW, left = S - full;
  GroupSums r = g;  // a local copy stays in registers; channels alternate accumulator pairs
  for (int64_t c = 0; c < cg; ++c) {
    const float *xr = kNorm ? x + c * sxc : nullptr, *xsr = kSum ? xs + c * sxc : nullptr;
    float* yr = kNorm ? y + c * syc : nullptr;
    const vf va = vset(kNorm ? a[c] : 0.0f), vt = vset(kNorm ? t[c] : 0.0f), vo = vset(kSum ? off[c] : 0.0f);
    auto step = [&](int64_t j, vf& s1v, vf& s2v) {
      if (kNorm) vstore(yr + j, act<kSilu>(vfma(vload(xr + j), va, vt)));
      if (kSum) {
        const vf d = vadd(vload(xsr + j), vo);
        s1v = vadd(s1v, d);
        s2v = vfma(d, d, s2v);
      }
    };
    int64_t i = 0;
    while (i < full) {
      const int64_t end = kSum ? imin(i + (kFlush - r.count) * kW, full) : full;
      if (kSum) r.count += (end - i) / kW;
      for (; i + 2 * kW <= end; i += 2 * kW) {
        step(i, r.a1, r.a2);
        step(i + kW, r.b1, r.b2);
      }
      if (i < end) {
        step(i, r.a1, r.a2);
        i += kW;
      }
      if (kSum && r.count == kFlush) r.flush();
    }
    if (left) {
      if (kNorm) vstore_n(yr + full, act<kSilu>(vfma(vload_n(xr + full, left), va, vt)), left);
      if (kSum) {
        const vf d = vkeep_n(vadd(vload_n(xsr + full, left), vo), left);
        r.b1 = vadd(r.b1, d);
        r.b2 = vfma(d, d, r.b2);
        if (++r.count == kFlush) r.flush();
      }
    }
    std::swap(r.a1, r.b1);
    std::swap(r.a2, r.b2);
  }
  g = r;
}

// Rows contiguous per channel: tasks of one (batch, group). A thread claims its next task
// before it runs the current one (for_each_task_ahead) and sums the next task's rows while it
// normalises the current one's, which are in L1/L2 since they were summed the same way.
template <bool kSilu>
void run_rows(const GroupNormParams& p) {
  const int64_t cg = p.C / p.G, tasks = p.B * p.G, S = p.S, n = cg * S;
  auto task_x = [&](int64_t k) { return p.x + k / p.G * p.sxb + k % p.G * cg * p.sxc; };
  auto add_of = [&](int64_t k, int64_t c) { return p.add ? p.add[k / p.G * p.sab + (k % p.G * cg + c) * p.sac] : 0.0f; };
  // off_c = add_c - shift for task k; returns shift (the group's first value).
  auto offsets = [&](int64_t k, float* off) {
    const float shift = task_x(k)[0] + add_of(k, 0);
    for (int64_t c = 0; c < cg; ++c) off[c] = add_of(k, c) - shift;
    return static_cast<double>(shift);
  };
  std::atomic<int64_t> counter{0};
#pragma omp parallel
  {
    Buf<float> a(cg), t(cg), off(cg);
    GroupSums g;
    double shift = 0.0;
    bool summed = false;  // g holds the current task's moments
    for_each_task_ahead(counter, tasks, [&](int64_t cur, int64_t next) {
      const int64_t b = cur / p.G, c0 = cur % p.G * cg;
      const float* x = task_x(cur);
      float* y = p.y + b * p.syb + c0 * p.syc;
      if (!summed) {
        g.reset();
        shift = offsets(cur, off.data());
        group_pass<false, true, kSilu>(nullptr, nullptr, nullptr, nullptr, x, off.data(), cg, S, p.sxc, p.syc, g);
      }
      g.flush();
      group_affine(p, b, c0, cg, shift + g.s1 / n, g.s2 - g.s1 * g.s1 / n, a.data(), t.data());
      summed = next < tasks;
      if (summed) {
        g.reset();
        shift = offsets(next, off.data());
        group_pass<true, true, kSilu>(x, y, a.data(), t.data(), task_x(next), off.data(), cg, S, p.sxc, p.syc, g);
      } else {
        group_pass<true, false, kSilu>(x, y, a.data(), t.data(), nullptr, nullptr, cg, S, p.sxc, p.syc, g);
      }
    });
  }
}

constexpr int64_t kChunkBytes = 64 * 1024;      // rows per channels-last chunk: about 64 KB
constexpr int64_t kWaveBytes = 3 * 1024 * 1024 / 2;  // one thread's share of a wave (in L2)

// Channels-last, one wave of batch entries [b0, b1): phase 1 (sums), combine, phase 2.
template <bool kSilu>
void channels_last_wave(const GroupNormParams& p, int64_t b0, int64_t b1, int64_t rows, double* sums, float* a,
                        float* t, float* f, Moments* mom) {
  const int64_t C = p.C, cg = C / p.G, per_batch = (p.S + rows - 1) / rows, tasks = (b1 - b0) * per_batch;
  const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
  const int64_t t0 = tasks * tid / nth, t1 = tasks * (tid + 1) / nth;
  double* mine = sums + tid * p.B * C * 2;  // [B][2][C] per thread
  for (int64_t i = b0 * C * 2; i < b1 * C * 2; ++i) mine[i] = 0.0;
  for (int64_t k = t0; k < t1; ++k) {
    const int64_t b = b0 + k / per_batch, s0 = k % per_batch * rows;
    const float* xb = p.x + b * p.sxb;  // row 0 of the batch entry is every chunk's shift
    rows_sums(xb + s0 * p.sxs, imin(rows, p.S - s0), p.sxs, C, xb, f, mine + b * 2 * C, mine + b * 2 * C + C);
  }
#pragma omp barrier
#pragma omp for schedule(static)
  for (int64_t bg = b0 * p.G; bg < b1 * p.G; ++bg) {
    const int64_t b = bg / p.G, c0 = bg % p.G * cg;
    for (int64_t c = 0; c < cg; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t th = 0; th < nth; ++th) {
        s1 += sums[(th * p.B + b) * 2 * C + c0 + c];
        s2 += sums[(th * p.B + b) * 2 * C + C + c0 + c];
      }
      mom[c] = finish(p.x[b * p.sxb + c0 + c], s1, s2, p.S);
    }
    group_affine(p, b, c0, cg, mom, a + b * C + c0, t + b * C + c0);
  }
  for (int64_t k = t1 - 1; k >= t0; --k) {  // last read first: still in L2
    const int64_t b = b0 + k / per_batch, s0 = k % per_batch * rows;
    for (int64_t s = s0; s < imin(s0 + rows, p.S); ++s) {
      const float* x = p.x + b * p.sxb + s * p.sxs;
      affine_row<kSilu>(x, p.y + b * p.syb + s * p.sys, C, a + b * C, t + b * C);
    }
  }
}

// Batch entries go in waves small enough that each thread's rows of a wave fit in L2 (one
// entry per wave when even that does not fit), so phase 2 reads them from there.
template <bool kSilu>
void run_channels_last(const GroupNormParams& p) {
  const int64_t C = p.C, cg = C / p.G, rows = imax(1, kChunkBytes / (C * 4));
  Buf<double> sums(static_cast<int64_t>(omp_get_max_threads()) * p.B * C * 2);
  Buf<float> a(p.B * C), t(p.B * C);
#pragma omp parallel
  {
    const int64_t per_wave = imax(1, omp_get_num_threads() * kWaveBytes / (p.S * C * 4));
    Buf<float> f(2 * C);
    Buf<Moments> mom(cg);
    for (int64_t b0 = 0; b0 < p.B; b0 += per_wave)
      channels_last_wave<kSilu>(p, b0, imin(b0 + per_wave, p.B), rows, sums.data(), a.data(), t.data(), f.data(),
                                mom.data());
  }
}

}  // namespace

void group_norm(const GroupNormParams& p) {
  if (p.B == 0 || p.C == 0 || p.S == 0) return;
  // Channels-last, or rows of one element (HW = 1: both layouts are the same memory, and
  // rows of whole channels beat one task per group of single-element rows).
  const bool channels_last = p.sxs != 1 || (p.S == 1 && p.sxc == 1 && p.syc == 1);
  if (channels_last) {
    if (p.silu) run_channels_last<true>(p);
    else run_channels_last<false>(p);
  } else {
    if (p.silu) run_rows<true>(p);
    else run_rows<false>(p);
  }
}

}  // namespace SDFAST_ISA
}  // namespace cpu
}  // namespace sdfast
