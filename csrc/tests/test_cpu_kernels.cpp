// C++ tests of the CPU kernels (csrc/cpu) against naive double-precision loops. Run by ctest.
// Exit status 0 when every case is within tolerance; each failure is printed.
#include <cmath>
#include <cstdio>
#include <memory>
#include <new>
#include <random>
#include <vector>

#include "cpu/kernels.h"
#include "cpu_test_main.h"

using namespace sdfast::cpu;

static int g_failures = 0;

static std::vector<float> randn(size_t n, unsigned seed, float mean = 0.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(mean, 1.0f);
  std::vector<float> out(n);
  for (auto& v : out) v = dist(gen);
  return out;
}

static void expect_close(const char* name, const std::vector<float>& got,
                         const std::vector<double>& want, double tol) {
  // Per element and negated, so that a NaN (std::max would drop it) fails; counted and reported.
  bool ok = got.size() == want.size();
  double worst = 0.0;
  size_t nans = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= tol)) ok = false;
    if (std::isnan(err)) ++nans;
    else worst = std::max(worst, err);
  }
  std::printf("%-48s max|err| %.3g (tol %.3g), %zu NaN %s\n", name, worst, tol, nans, ok ? "ok" : "FAIL");
  if (!ok) ++g_failures;
}

// mean: of x (far from 0 tests the statistics' cancellation; the output's own rounding, from
// y = x * a + t with |x| ~ mean, grows with it, hence the tolerance).
static void test_group_norm(int64_t B, int64_t C, int64_t S, int64_t G, bool channels_last, bool silu,
                            bool add, float mean = 0.5f) {
  auto x = randn(B * C * S, 1, mean), w = randn(C, 2), b = randn(C, 3), a = randn(B * C, 4);
  std::vector<float> y(x.size());
  std::vector<double> ref(x.size());
  // logical (b, c, s) -> memory offset
  auto off = [&](int64_t bi, int64_t c, int64_t s) {
    return channels_last ? bi * S * C + s * C + c : bi * C * S + c * S + s;
  };
  const int64_t Cg = C / G;
  for (int64_t bi = 0; bi < B; ++bi)
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0, sq = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t s = 0; s < S; ++s) sum += x[off(bi, c, s)] + (add ? a[bi * C + c] : 0.0);
      const double mean = sum / (Cg * S);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t s = 0; s < S; ++s) {
          const double d = x[off(bi, c, s)] + (add ? a[bi * C + c] : 0.0) - mean;
          sq += d * d;
        }
      const double rstd = 1.0 / std::sqrt(sq / (Cg * S) + 1e-5);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t s = 0; s < S; ++s) {
          double v = (x[off(bi, c, s)] + (add ? a[bi * C + c] : 0.0) - mean) * rstd * w[c] + b[c];
          if (silu) v = v / (1.0 + std::exp(-v));
          ref[off(bi, c, s)] = v;
        }
    }
  const int64_t sb = C * S, sc = channels_last ? 1 : S, ss = channels_last ? C : 1;
  GroupNormParams p{x.data(), y.data(), w.data(), b.data(), add ? a.data() : nullptr, B, C, S, G,
                    sb, sc, ss, sb, sc, ss, C, 1, 1e-5f, silu};
  group_norm(p);
  char name[128];
  std::snprintf(name, sizeof name, "group_norm B%lld C%lld S%lld G%lld %s%s%s mean %g", (long long)B,
                (long long)C, (long long)S, (long long)G, channels_last ? "nhwc" : "nchw",
                silu ? " silu" : "", add ? " add" : "", mean);
  expect_close(name, y, ref, 5e-6 * std::max(1.0, std::fabs(mean) / 10.0));
}

// lanes: the score layout (AttentionParams::queries_in_lanes; -1 chosen by shape)
static void test_attention(int64_t B, int64_t H, int64_t N, int64_t M, int64_t D, int64_t key_block, int64_t lanes) {
  auto q = randn(B * H * N * D, 5), k = randn(B * H * M * D, 6), v = randn(B * H * M * D, 7);
  std::vector<float> o(B * H * N * D);
  std::vector<double> ref(o.size()), s(M);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t i = 0; i < N; ++i) {
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j < M; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(q[(bh * N + i) * D + d]) * k[(bh * M + j) * D + d];
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      for (int64_t j = 0; j < M; ++j) sum += s[j] = std::exp(s[j] - mx);
      for (int64_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int64_t j = 0; j < M; ++j) acc += s[j] * v[(bh * M + j) * D + d];
        ref[(bh * N + i) * D + d] = acc / sum;
      }
    }
  AttentionParams p{q.data(), k.data(), v.data(), o.data(), B, H, N, M, D,
                    H * N * D, N * D, D, H * M * D, M * D, D, H * M * D, M * D, D, H * N * D, N * D, D,
                    static_cast<float>(scale), key_block, lanes};
  attention(p);
  char name[128];
  std::snprintf(name, sizeof name, "attention B%lld H%lld N%lld M%lld D%lld kb%lld lanes%lld", (long long)B,
                (long long)H, (long long)N, (long long)M, (long long)D, (long long)key_block, (long long)lanes);
  expect_close(name, o, ref, 2e-5);
}

struct LoraCase {
  int64_t O, I;
  std::vector<int64_t> ranks;
  std::vector<float> w;
  std::vector<double> ref;
  std::vector<std::vector<float>> ups, downs;
  std::vector<const float*> up_p, down_p;
  std::vector<int64_t> up_ld, down_ld;
  std::vector<float> scales;

  LoraCase(int64_t o, int64_t i, std::vector<int64_t> rk, unsigned seed) : O(o), I(i), ranks(std::move(rk)) {
    w = randn(O * I, seed);
    ref.assign(w.begin(), w.end());
    for (size_t l = 0; l < ranks.size(); ++l) {
      const int64_t r = ranks[l];
      ups.push_back(randn(O * r, seed + 9 + l));
      downs.push_back(randn(r * I, seed + 19 + l));
      scales.push_back(0.5f + l);
      for (int64_t a = 0; a < O; ++a)
        for (int64_t b = 0; b < I; ++b) {
          double acc = 0;
          for (int64_t k = 0; k < r; ++k) acc += double(ups[l][a * r + k]) * downs[l][k * I + b];
          ref[a * I + b] += scales[l] * acc;
        }
      up_ld.push_back(r);
      down_ld.push_back(I);
    }
    for (size_t l = 0; l < ranks.size(); ++l) {
      up_p.push_back(ups[l].data());
      down_p.push_back(downs[l].data());
    }
  }
  LoraMergeParams params() {
    return LoraMergeParams{w.data(), O, I, I, static_cast<int64_t>(ranks.size()), up_p.data(), up_ld.data(),
                           down_p.data(), down_ld.data(), ranks.data(), scales.data()};
  }
  void check() {
    char name[128];
    std::snprintf(name, sizeof name, "lora_merge O%lld I%lld loras %zu", (long long)O, (long long)I, ranks.size());
    expect_close(name, w, ref, 5e-5);
  }
};

static void test_lora(int64_t O, int64_t I, std::vector<int64_t> ranks) {
  LoraCase c(O, I, std::move(ranks), 8);
  lora_merge(c.params());
  c.check();
}

// Several weights (one of them untouched: rank list empty) merged in one call.
static void test_lora_layers() {
  std::vector<LoraCase> cases;
  cases.emplace_back(320, 768, std::vector<int64_t>{32}, 30);
  cases.emplace_back(7, 297, std::vector<int64_t>{1, 4}, 40);
  cases.emplace_back(50, 50, std::vector<int64_t>{}, 50);
  cases.emplace_back(96, 77, std::vector<int64_t>{128}, 60);
  std::vector<LoraMergeParams> ps;
  for (auto& c : cases) ps.push_back(c.params());
  lora_merge(ps.data(), static_cast<int64_t>(ps.size()));
  for (auto& c : cases) c.check();
}

// From a source: W (garbage before) = src + the LoRAs, src untouched; with no LoRA a copy.
// aligned: W in 64-byte aligned memory (with whole-vector rows the kernel then streams it).
static void test_lora_from_source(int64_t O, int64_t I, std::vector<int64_t> ranks, bool aligned = false) {
  LoraCase c(O, I, std::move(ranks), 70);
  const std::vector<float> src = c.w;
  const int64_t lds = I + 3;  // a source with its own row stride
  std::vector<float> padded(O * lds, 123.f);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i) padded[o * lds + i] = src[o * I + i];
  std::fill(c.w.begin(), c.w.end(), -7.f);
  LoraMergeParams p = c.params();
  p.src = padded.data();
  p.lds = lds;
  struct AlignedDelete {
    void operator()(float* q) const { ::operator delete[](q, std::align_val_t(64)); }
  };
  std::unique_ptr<float[], AlignedDelete> out;
  if (aligned) {
    out.reset(new (std::align_val_t(64)) float[O * I]);
    std::fill(out.get(), out.get() + O * I, -7.f);
    p.w = out.get();
  }
  lora_merge(&p, 1);
  if (aligned) std::copy(out.get(), out.get() + O * I, c.w.begin());
  c.check();
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i)
      if (padded[o * lds + i] != src[o * I + i]) {
        std::printf("FAIL lora_merge from source: the source changed at (%lld, %lld)\n", (long long)o, (long long)i);
        ++g_failures;
        return;
      }
}

static void run_all() {
  test_group_norm(2, 64, 63, 32, false, false, false);
  test_group_norm(2, 64, 63, 32, true, true, true);
  test_group_norm(1, 96, 1, 32, false, true, false);
  test_group_norm(1, 320, 64, 32, true, false, true);
  test_group_norm(2, 640, 63, 32, true, true, true);    // 20-channel groups, 80-channel tasks
  test_group_norm(2, 40, 17, 8, true, true, false);     // 5-channel groups: one group per task
  test_group_norm(1, 1280, 9, 32, false, true, true);
  test_group_norm(3, 64, 8192, 32, true, true, true);   // 2 MB per batch entry: one per wave
  test_group_norm(2, 64, 0, 32, false, true, false);     // empty: nothing to do
  test_group_norm(2, 320, 1024, 32, false, true, true, 300.0f);  // far from 0: no cancellation
  test_group_norm(2, 320, 63, 32, true, true, true, 300.0f);
  test_group_norm(2, 1280, 16, 32, false, false, false, -300.0f);
  // each case in both score layouts and as chosen by shape
  for (int64_t lanes = -1; lanes <= 1; ++lanes) {
    test_attention(1, 2, 70, 77, 40, 0, lanes);
    test_attention(2, 1, 33, 154, 80, 0, lanes);
    test_attention(1, 1, 65, 300, 64, 64, lanes);
    test_attention(1, 1, 17, 600, 160, 0, lanes);
    test_attention(1, 2, 100, 77, 160, 0, lanes);
    test_attention(1, 1, 50, 77, 72, 0, lanes);         // head dim not a whole AVX-512 vector
    test_attention(1, 1, 7, 1, 20, 0, lanes);           // one key
    test_attention(2, 2, 97, 700, 40, 0, lanes);        // SD1.5's head dim, several key blocks
    test_attention(1, 1, 49, 301, 37, 96, lanes);       // odd head dim and key block, 1 query over
    test_attention(1, 2, 1, 650, 40, 37, lanes);        // one query; a key block of no vector multiple
  }
  test_lora(45, 77, {1});
  test_lora(64, 321, {4, 7});
  test_lora(33, 9 * 20, {128});
  test_lora_layers();
  test_lora_from_source(45, 1100, {4, 32});
  test_lora_from_source(7, 20, {});
  test_lora_from_source(50, 2048, {32, 4}, true);  // streamed stores
}

int main() { return run_on_every_isa(run_all, g_failures); }
