// C++ test of the Winograd F(4x4, 3x3) convolution (csrc/cpu/winograd.cpp) against naive
// double-precision loops, on every instruction set built and supported here. Run by ctest.
//
// Tolerance: the standard first-order bound for a computation in floating point, |y - y_exact|
// <= gamma_n * (the same computation on absolute values), gamma_n = n u / (1 - n u), u = 2^-24.
// For Winograd that computation is |A^T| [sum_i (|G| |g_oi| |G|^T) (.) (|B^T| |d_i| |B|)] |A|
// (+ |bias| + |add|), and n bounds the roundings along any path to an output: 4 in the input
// transform (two passes of two), 8 in the weight transform (two passes of four, counting the
// constants -8/15 and 1/30 fp32 cannot hold), 1 product, Cin - 1 in the channel sum, 6 in the
// output transform, 2 for bias and add: n = Cin + 20 (tests/test_conv.py uses the same bound).
// The direct convolution's own bound (gamma_{9 Cin + 2} times sum |x| |w|) is printed for scale.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/kernels.h"
#include "cpu_test_main.h"

using namespace sdfast::cpu;

static int g_failures = 0;

static const double kBT[6][6] = {{1, 0, -4.25, 0, 1, 0},    {0, -2, -4, 0.5, 1, 0},
                                 {0, 2, -4, -0.5, 1, 0},     {0, -0.5, -0.25, 2, 1, 0},
                                 {0, 0.5, -0.25, -2, 1, 0},  {0, 1, 0, -4.25, 0, 1}};
static const double kG[6][3] = {{1, 0, 0},
                                {-8.0 / 15, -4.0 / 15, -2.0 / 15},
                                {-8.0 / 15, 4.0 / 15, -2.0 / 15},
                                {1.0 / 30, 1.0 / 15, 2.0 / 15},
                                {1.0 / 30, -1.0 / 15, 2.0 / 15},
                                {0, 0, 1}};
static const double kAT[4][6] = {{1, 1, 1, 1, 1, 0},
                                 {0, 0.5, -0.5, 2, -2, 0},
                                 {0, 0.25, 0.25, 4, 4, 0},
                                 {0, 0.125, -0.125, 8, -8, 1}};

static std::vector<float> randn(size_t n, unsigned seed, float mean, float std) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(mean, std);
  std::vector<float> out(n);
  for (auto& v : out) v = dist(gen);
  return out;
}

struct Case {
  int64_t B, H, W, Cin, Cout;
  int64_t pad;  // extra floats per pixel of x (a channel slice of a wider tensor)
  bool bias, add;
};

// |M| X |N|^T for small dense matrices: out[r][c] = sum |M[r][k]| X[k][l] |N[c][l]|
template <int R, int K, int C, int L>
static void abs_sandwich(const double (&m)[R][K], const double* x, const double (&n)[C][L], double* out) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      double acc = 0;
      for (int k = 0; k < K; ++k)
        for (int l = 0; l < L; ++l) acc += std::fabs(m[r][k]) * x[k * L + l] * std::fabs(n[c][l]);
      out[r * C + c] = acc;
    }
}

static void test_conv(const Case& k, unsigned seed) {
  const int64_t ldx = k.Cin + k.pad;
  // activations as a UNet feeds them (after GroupNorm + SiLU: mostly positive, mean ~0.3)
  auto x = randn(k.B * k.H * k.W * ldx, seed, 0.3f, 1.0f);
  auto w = randn(k.Cout * k.Cin * 9, seed + 1, 0.0f, 1.0f / std::sqrt(9.0f * k.Cin));
  auto bias = randn(k.Cout, seed + 2, 0.0f, 0.1f);
  auto add = randn(k.B * k.H * k.W * k.Cout, seed + 3, 0.0f, 1.0f);
  std::vector<float> y(k.B * k.H * k.W * k.Cout, NAN);
  auto X = [&](int64_t b, int64_t h, int64_t w_, int64_t c) -> double {
    if (h < 0 || h >= k.H || w_ < 0 || w_ >= k.W) return 0.0;
    return x[((b * k.H + h) * k.W + w_) * ldx + c];
  };
  const int64_t th = (k.H + 3) / 4, tw = (k.W + 3) / 4;
  double worst = 0, worst_ratio = 0, direct_bound_max = 0, wino_bound_max = 0;
  std::vector<double> ref(y.size()), bound(y.size()), direct_bound(y.size());
  std::vector<double> V(36 * k.Cin), acc(36), d(36), g(9), u(36), ytile(16);
  for (int64_t b = 0; b < k.B; ++b)
    for (int64_t ti = 0; ti < th; ++ti)
      for (int64_t tj = 0; tj < tw; ++tj) {
        for (int64_t i = 0; i < k.Cin; ++i) {  // |B^T| |d_i| |B|
          for (int r = 0; r < 6; ++r)
            for (int c = 0; c < 6; ++c) d[r * 6 + c] = std::fabs(X(b, ti * 4 - 1 + r, tj * 4 - 1 + c, i));
          abs_sandwich(kBT, d.data(), kBT, V.data() + 36 * i);
        }
        for (int64_t o = 0; o < k.Cout; ++o) {
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t i = 0; i < k.Cin; ++i) {
            for (int j = 0; j < 9; ++j) g[j] = std::fabs(w[(o * k.Cin + i) * 9 + j]);
            abs_sandwich(kG, g.data(), kG, u.data());
            for (int q = 0; q < 36; ++q) acc[q] += u[q] * V[36 * i + q];
          }
          abs_sandwich(kAT, acc.data(), kAT, ytile.data());
          for (int r = 0; r < 4; ++r)
            for (int c = 0; c < 4; ++c) {
              const int64_t h = ti * 4 + r, w_ = tj * 4 + c;
              if (h >= k.H || w_ >= k.W) continue;
              const int64_t at = ((b * k.H + h) * k.W + w_) * k.Cout + o;
              double exact = k.bias ? bias[o] : 0.0, mag = 0;
              if (k.add) exact += add[at];
              for (int64_t i = 0; i < k.Cin; ++i)
                for (int kh = 0; kh < 3; ++kh)
                  for (int kw = 0; kw < 3; ++kw) {
                    const double term = X(b, h + kh - 1, w_ + kw - 1, i) * w[((o * k.Cin + i) * 3 + kh) * 3 + kw];
                    exact += term;
                    mag += std::fabs(term);
                  }
              const double extra = (k.bias ? std::fabs(bias[o]) : 0.0) + (k.add ? std::fabs(add[at]) : 0.0);
              ref[at] = exact;
              bound[at] = ytile[r * 4 + c] + extra;
              direct_bound[at] = mag + extra;
            }
        }
      }
  Conv3x3Params p{x.data(), w.data(), k.bias ? bias.data() : nullptr, k.add ? add.data() : nullptr, y.data(),
                  k.B, k.H, k.W, k.Cin, k.Cout,
                  k.H * k.W * ldx, k.W * ldx, ldx,
                  k.H * k.W * k.Cout, k.W * k.Cout, k.Cout,
                  k.H * k.W * k.Cout, k.W * k.Cout, k.Cout};
  conv3x3_winograd(p);
  const double u_ = std::ldexp(1.0, -24);
  const double n_wino = 4 + 8 + 1 + (k.Cin - 1) + 6 + 2, n_direct = 9 * k.Cin + 2;
  const double gamma = n_wino * u_ / (1 - n_wino * u_), gamma_direct = n_direct * u_ / (1 - n_direct * u_);
  bool ok = true;
  for (size_t i = 0; i < y.size(); ++i) {
    const double err = std::fabs(y[i] - ref[i]);  // NaN (an output never written) fails below
    if (!(err <= gamma * bound[i])) ok = false;
    worst = std::max(worst, err);
    worst_ratio = std::max(worst_ratio, err / (gamma * bound[i]));
    wino_bound_max = std::max(wino_bound_max, gamma * bound[i]);
    direct_bound_max = std::max(direct_bound_max, gamma_direct * direct_bound[i]);
  }
  std::printf("conv3x3 B%lld %lldx%lld Cin%lld Cout%lld pad%lld%s%s  max|err| %.3g, err/bound <= %.3g "
              "(bounds: winograd %.3g, direct %.3g) %s\n",
              (long long)k.B, (long long)k.H, (long long)k.W, (long long)k.Cin, (long long)k.Cout,
              (long long)k.pad, k.bias ? " bias" : "", k.add ? " add" : "", worst, worst_ratio, wino_bound_max,
              direct_bound_max, ok ? "ok" : "FAIL");
  if (!ok) ++g_failures;
}

static void run_all() {
  const Case cases[] = {
      {1, 4, 4, 8, 8, 0, false, false},       // one tile
      {2, 8, 8, 64, 64, 0, true, false},      // whole channel blocks
      {2, 9, 7, 70, 67, 3, true, true},       // partial tiles, channels past whole vectors/blocks, x a slice
      {1, 1, 1, 5, 3, 0, true, false},        // 1x1 image: only the centre tap sees data
      {1, 13, 6, 3, 130, 0, false, true},     // few input channels, three output blocks
      {3, 17, 21, 130, 20, 1, true, false},   // more tiles than one task block holds (64)
  };
  unsigned seed = 1;
  for (const Case& c : cases) test_conv(c, seed += 10);
}

int main() { return run_on_every_isa(run_all, g_failures); }
