// sdfast._C: the CPU kernels, torch-free, behind pybind11.
// Each binding takes buffer addresses (ints), sizes and strides (in elements) and fills the
// kernel's params struct; all input checks live in sdfast/ops/cpu_backend.py, so nothing
// here knows about tensors. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/kernels.h"

namespace py = pybind11;
using sdfast::cpu::AttentionParams;
using sdfast::cpu::Conv3x3Params;
using sdfast::cpu::GroupNormParams;
using sdfast::cpu::LoraMergeParams;

#if defined(__AVX2__)
static constexpr bool kHasAvx2 = true;
#else
static constexpr bool kHasAvx2 = false;
#endif

template <typename T>
static T* ptr(std::uintptr_t addr) { return reinterpret_cast<T*>(addr); }

// Threads for the next kernel (the caller passes torch.get_num_threads()); 0 keeps the default.
static void set_threads(int threads) {
#ifdef _OPENMP
  if (threads > 0) omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

static void group_norm_f32(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight,
                           std::uintptr_t bias, std::uintptr_t add, int64_t B, int64_t C, int64_t S,
                           int64_t G, std::vector<int64_t> x_strides, std::vector<int64_t> y_strides,
                           std::vector<int64_t> add_strides, double eps, bool silu, int threads) {
  GroupNormParams p{ptr<const float>(x), ptr<float>(y), ptr<const float>(weight),
                    ptr<const float>(bias), ptr<const float>(add), B, C, S, G,
                    x_strides.at(0), x_strides.at(1), x_strides.at(2),
                    y_strides.at(0), y_strides.at(1), y_strides.at(2),
                    add_strides.at(0), add_strides.at(1), static_cast<float>(eps), silu};
  py::gil_scoped_release release;
  set_threads(threads);
  sdfast::cpu::group_norm(p);
}

static void attention_f32(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                          int64_t B, int64_t H, int64_t N, int64_t M, int64_t D,
                          std::vector<int64_t> q_strides, std::vector<int64_t> k_strides,
                          std::vector<int64_t> v_strides, std::vector<int64_t> o_strides,
                          double scale, int64_t key_block, int threads, int64_t queries_in_lanes) {
  AttentionParams p{ptr<const float>(q), ptr<const float>(k), ptr<const float>(v), ptr<float>(o),
                    B, H, N, M, D,
                    q_strides.at(0), q_strides.at(1), q_strides.at(2),
                    k_strides.at(0), k_strides.at(1), k_strides.at(2),
                    v_strides.at(0), v_strides.at(1), v_strides.at(2),
                    o_strides.at(0), o_strides.at(1), o_strides.at(2),
                    static_cast<float>(scale), key_block, queries_in_lanes};
  py::gil_scoped_release release;
  set_threads(threads);
  sdfast::cpu::attention(p);
}

// One weight's LoRAs: (w, O, I, ldw, ups, ups_ld, downs, downs_ld, ranks, scales, src, lds);
// src 0: in place, else w = src + the LoRAs (src [O, I] with row stride lds).
using LoraLayer = std::tuple<std::uintptr_t, int64_t, int64_t, int64_t, std::vector<std::uintptr_t>,
                             std::vector<int64_t>, std::vector<std::uintptr_t>, std::vector<int64_t>,
                             std::vector<int64_t>, std::vector<float>, std::uintptr_t, int64_t>;

static void lora_merge_layers_f32(const std::vector<LoraLayer>& layers, int threads) {
  const size_t n_layers = layers.size();
  std::vector<LoraMergeParams> params(n_layers);
  std::vector<std::vector<const float*>> up_p(n_layers), down_p(n_layers);
  for (size_t i = 0; i < n_layers; ++i) {
    const auto& [w, O, I, ldw, ups, ups_ld, downs, downs_ld, ranks, scales, src, lds] = layers[i];
    const size_t n = ups.size();
    if (downs.size() != n || ups_ld.size() != n || downs_ld.size() != n || ranks.size() != n ||
        scales.size() != n)
      throw py::value_error("lora_merge_layers_f32: per-LoRA lists differ in length");
    for (size_t l = 0; l < n; ++l) {
      up_p[i].push_back(ptr<const float>(ups[l]));
      down_p[i].push_back(ptr<const float>(downs[l]));
    }
    params[i] = LoraMergeParams{ptr<float>(w), O, I, ldw, static_cast<int64_t>(n), up_p[i].data(),
                                ups_ld.data(), down_p[i].data(), downs_ld.data(), ranks.data(), scales.data(),
                                src ? ptr<const float>(src) : nullptr, lds};
  }
  py::gil_scoped_release release;
  set_threads(threads);
  sdfast::cpu::lora_merge(params.data(), static_cast<int64_t>(n_layers));
}

static void lora_merge_f32(std::uintptr_t w, int64_t O, int64_t I, int64_t ldw,
                           std::vector<std::uintptr_t> ups, std::vector<int64_t> ups_ld,
                           std::vector<std::uintptr_t> downs, std::vector<int64_t> downs_ld,
                           std::vector<int64_t> ranks, std::vector<float> scales, std::uintptr_t src,
                           int64_t lds, int threads) {
  lora_merge_layers_f32({LoraLayer{w, O, I, ldw, ups, ups_ld, downs, downs_ld, ranks, scales, src, lds}}, threads);
}

// x [B, H, W, Cin], y and add [B, H, W, Cout] channels-last: strides (b, h, w), channel stride 1.
static void conv3x3_winograd_f32(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias,
                                 std::uintptr_t add, std::uintptr_t y, int64_t B, int64_t H, int64_t W,
                                 int64_t Cin, int64_t Cout, std::vector<int64_t> x_strides,
                                 std::vector<int64_t> y_strides, std::vector<int64_t> add_strides,
                                 int threads) {
  Conv3x3Params p{ptr<const float>(x), ptr<const float>(weight), ptr<const float>(bias),
                  ptr<const float>(add), ptr<float>(y), B, H, W, Cin, Cout,
                  x_strides.at(0), x_strides.at(1), x_strides.at(2),
                  y_strides.at(0), y_strides.at(1), y_strides.at(2),
                  add_strides.at(0), add_strides.at(1), add_strides.at(2)};
  py::gil_scoped_release release;
  set_threads(threads);
  sdfast::cpu::conv3x3_winograd(p);
}

static bool set_cpu_isa(const std::string& name) { return sdfast::cpu::set_isa(name.c_str()); }
static bool cpu_isa_available(const std::string& name) { return sdfast::cpu::isa_available(name.c_str()); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "sdfast CPU kernels (torch-free): addresses, sizes and element strides in";
  m.attr("built_with_avx2") = kHasAvx2;
#ifdef _OPENMP
  m.attr("built_with_openmp") = true;
#else
  m.attr("built_with_openmp") = false;
#endif
  m.def("group_norm_f32", &group_norm_f32, "GroupNorm (+add, +SiLU) over [B, C, S], fp32",
        py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("add"),
        py::arg("B"), py::arg("C"), py::arg("S"), py::arg("G"), py::arg("x_strides"),
        py::arg("y_strides"), py::arg("add_strides"), py::arg("eps"), py::arg("silu"), py::arg("threads") = 0);
  m.def("attention_f32", &attention_f32, "softmax(q k^T * scale) v over [B, H, N|M, D], fp32",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("B"), py::arg("H"),
        py::arg("N"), py::arg("M"), py::arg("D"), py::arg("q_strides"), py::arg("k_strides"),
        py::arg("v_strides"), py::arg("o_strides"), py::arg("scale"), py::arg("key_block") = 0,
        py::arg("threads") = 0, py::arg("queries_in_lanes") = -1);
  m.def("lora_merge_f32", &lora_merge_f32,
        "W += sum_l scale_l up_l @ down_l in place, fp32; with src != 0, W = src + the same sum",
        py::arg("w"), py::arg("O"), py::arg("I"), py::arg("ldw"), py::arg("ups"), py::arg("ups_ld"),
        py::arg("downs"), py::arg("downs_ld"), py::arg("ranks"), py::arg("scales"), py::arg("src") = 0,
        py::arg("lds") = 0, py::arg("threads") = 0);
  m.def("lora_merge_layers_f32", &lora_merge_layers_f32,
        "lora_merge_f32 over several weights in one parallel pass: a list of its argument tuples "
        "(w, O, I, ldw, ups, ups_ld, downs, downs_ld, ranks, scales, src, lds)",
        py::arg("layers"), py::arg("threads") = 0);
  m.def("conv3x3_winograd_f32", &conv3x3_winograd_f32,
        "3x3 conv, stride 1, padding 1 (+ bias, + add), channels-last, by Winograd F(4x4, 3x3), fp32",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("add"), py::arg("y"), py::arg("B"),
        py::arg("H"), py::arg("W"), py::arg("Cin"), py::arg("Cout"), py::arg("x_strides"),
        py::arg("y_strides"), py::arg("add_strides"), py::arg("threads") = 0);
  m.def("cpu_isa", &sdfast::cpu::isa, "the instruction set the kernels run with (avx2 | avx512)");
  m.def("set_cpu_isa", &set_cpu_isa, "force avx2 or avx512; False where not built or not supported",
        py::arg("name"));
  m.def("cpu_isa_available", &cpu_isa_available, "whether an ISA is built and supported here",
        py::arg("name"));
}
