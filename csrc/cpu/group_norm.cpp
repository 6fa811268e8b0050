// GroupNorm (+ optional per-(batch, channel) add before the norm, + optional SiLU), fp32.
//
// Statistics: per-channel sums of x - shift_c (shift_c one element of the channel, so
// sum(d^2) - sum(d)^2 / S does not cancel), in fp32 partials flushed into double every
// kFlush vectors or rows; then per group the Chan combination mean_g = avg_c mean_c, M2_g =
// sum_c M2_c + S sum_c (mean_c - mean_g)^2, with add[b, c] folded into mean_c (it shifts a
// channel, not its spread), and per channel y = act(x * a_c + t_c), a_c = rstd_g w_c,
// t_c = b_c + (add_c - mean_g) a_c.
//
// Rows contiguous per channel (NCHW, [B, C, N]): one task per (batch, group), x read from
// memory once: a thread normalises its current group from L2 (an SD1.5 group is 10-160 KB)
// in the same loop that sums its next group's rows from memory, so those loads overlap the
// SiLU arithmetic. Channels-last (and HW = 1): a group is strided over every row, and reading it
// strided wastes half the bandwidth, so two phases over contiguous chunks of rows instead:
// each thread sums its chunks into its own per-channel accumulators; then per group the
// threads' sums are combined; then each thread normalises its chunks, last read first (those
// are still in cache), in waves of batch entries sized for L2.
#include <omp.h>

#include <cmath>

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

// Per-channel affine (a, t) of the channels [c0, c0 + cg) of one group of batch entry b.
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
  const double rstd = 1.0 / std::sqrt(m2 / (static_cast<double>(p.S) * cg) + p.eps);
  for (int64_t c = 0; c < cg; ++c) {
    const double w = p.weight ? p.weight[c0 + c] : 1.0, bias = p.bias ? p.bias[c0 + c] : 0.0;
    const double add = p.add ? p.add[b * p.sab + (c0 + c) * p.sac] : 0.0;
    a[c] = static_cast<float>(rstd * w);
    t[c] = static_cast<float>(bias + (add - mean) * rstd * w);
  }
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

// One pass over a contiguous row of n floats: y[i] = act(x[i] * a + t) (kNorm), and the
// moments of another row xs[0, n) (kSum): the next task's, read in the same loop so that its
// loads overlap this row's arithmetic. Two accumulator pairs; fp32 partials flushed into
// double every kFlush vectors.
template <bool kNorm, bool kSum, bool kSilu>
Moments row_pass(const float* x, float* y, float a, float t, const float* xs, int64_t n) {
  const vf va = vset(a), vt = vset(t);
  const float shift = kSum ? xs[0] : 0.0f;
  const vf sh = vset(shift);
  const int64_t full = n / kW * kW;
  double s1 = 0.0, s2 = 0.0;
  int64_t i = 0;
  while (i < full) {
    const int64_t end = imin(i + kFlush * kW, full);
    vf a1 = vzero(), a2 = vzero(), b1 = vzero(), b2 = vzero();
    auto step = [&](int64_t j, vf& s1v, vf& s2v) {
      if (kNorm) vstore(y + j, act<kSilu>(vfma(vload(x + j), va, vt)));
      if (kSum) {
        const vf d = vsub(vload(xs + j), sh);
        s1v = vadd(s1v, d);
        s2v = vfma(d, d, s2v);
      }
    };
    for (; i + 2 * kW <= end; i += 2 * kW) {
      step(i, a1, a2);
      step(i + kW, b1, b2);
    }
    if (i < end) {
      step(i, a1, a2);
      i += kW;
    }
    if (kSum) {
      s1 += vsum(vadd(a1, b1));
      s2 += vsum(vadd(a2, b2));
    }
  }
  if (kNorm && i < n) vstore_n(y + i, act<kSilu>(vfma(vload_n(x + i, n - i), va, vt)), n - i);
  if (!kSum) return Moments{0.0, 0.0};
  for (; i < n; ++i) {
    const double d = static_cast<double>(xs[i]) - shift;
    s1 += d;
    s2 += d * d;
  }
  return finish(shift, s1, s2, n);
}

// Rows contiguous per channel: tasks of one (batch, group). A thread claims its next task
// before it runs the current one (for_each_task_ahead) and sums the next task's rows while it
// normalises the current one's, which are in L2 since they were summed the same way.
template <bool kSilu>
void run_rows(const GroupNormParams& p) {
  const int64_t cg = p.C / p.G, tasks = p.B * p.G, S = p.S;
  auto task_x = [&](int64_t k) { return p.x + k / p.G * p.sxb + k % p.G * cg * p.sxc; };
  std::atomic<int64_t> counter{0};
#pragma omp parallel
  {
    Buf<Moments> mom_a(cg), mom_b(cg);
    Buf<float> a(cg), t(cg);
    Moments *mom = mom_a.data(), *next_mom = mom_b.data();
    bool summed = false;  // mom holds the current task's moments
    for_each_task_ahead(counter, tasks, [&](int64_t cur, int64_t next) {
      const int64_t b = cur / p.G, c0 = cur % p.G * cg;
      const float* x = task_x(cur);
      float* y = p.y + b * p.syb + c0 * p.syc;
      if (!summed)
        for (int64_t c = 0; c < cg; ++c) mom[c] = row_pass<false, true, kSilu>(nullptr, nullptr, 0, 0, x + c * p.sxc, S);
      group_affine(p, b, c0, cg, mom, a.data(), t.data());
      summed = next < tasks;
      if (summed) {
        const float* xn = task_x(next);
        for (int64_t c = 0; c < cg; ++c)
          next_mom[c] = row_pass<true, true, kSilu>(x + c * p.sxc, y + c * p.syc, a[c], t[c], xn + c * p.sxc, S);
        std::swap(mom, next_mom);
      } else {
        for (int64_t c = 0; c < cg; ++c) row_pass<true, false, kSilu>(x + c * p.sxc, y + c * p.syc, a[c], t[c], nullptr, S);
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
