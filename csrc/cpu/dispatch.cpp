// Run-time choice of the instruction set behind the public kernels of kernels.h (one build of
// csrc/cpu/*.cpp per ISA, see simd.h and CMakeLists.txt). Compiled with the baseline flags.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "isa_kernels.h"

namespace sdfast {
namespace cpu {
namespace {

enum Isa : int { kUnset = -1, kAvx2 = 0, kAvx512 = 1 };

bool supported(int which) {
  if (which == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifdef SDFAST_WITH_AVX512
  if (which == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
  return false;
}

int parse(const char* name) {
  if (name == nullptr) return kUnset;
  if (std::strcmp(name, "avx2") == 0) return kAvx2;
  if (std::strcmp(name, "avx512") == 0) return kAvx512;
  return kUnset;
}

std::atomic<int> g_isa{kUnset};

int current() {
  int which = g_isa.load(std::memory_order_relaxed);
  if (which != kUnset) return which;
  const int forced = parse(std::getenv("SDFAST_CPU_ISA"));
  which = forced != kUnset && supported(forced) ? forced : (supported(kAvx512) ? kAvx512 : kAvx2);
  g_isa.store(which, std::memory_order_relaxed);
  return which;
}

}  // namespace

const char* isa() { return current() == kAvx512 ? "avx512" : "avx2"; }

bool isa_available(const char* name) {
  const int which = parse(name);
  return which != kUnset && supported(which);
}

bool set_isa(const char* name) {
  if (!isa_available(name)) return false;
  g_isa.store(parse(name), std::memory_order_relaxed);
  return true;
}

#ifdef SDFAST_WITH_AVX512
#define SDFAST_DISPATCH(fn, ...) (current() == kAvx512 ? avx512::fn(__VA_ARGS__) : avx2::fn(__VA_ARGS__))
#else
#define SDFAST_DISPATCH(fn, ...) avx2::fn(__VA_ARGS__)
#endif

void group_norm(const GroupNormParams& p) { SDFAST_DISPATCH(group_norm, p); }
void attention(const AttentionParams& p) { SDFAST_DISPATCH(attention, p); }
void lora_merge(const LoraMergeParams* layers, int64_t n_layers) { SDFAST_DISPATCH(lora_merge, layers, n_layers); }
void lora_merge(const LoraMergeParams& p) { lora_merge(&p, 1); }
void conv3x3_winograd(const Conv3x3Params& p) { SDFAST_DISPATCH(conv3x3_winograd, p); }

}  // namespace cpu
}  // namespace sdfast
