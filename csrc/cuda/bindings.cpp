// pybind11 module sdfast._C_cuda: the boundary for the CUDA kernels. Pointers arrive as integers
// (tensor.data_ptr()), the stream as an integer (torch.cuda.current_stream().cuda_stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <vector>

#include "kernels.h"

namespace py = pybind11;
using sdfast_cuda::kMaxHeadDim;

namespace {

std::array<int64_t, 3> strides3(const std::vector<int64_t>& s, const char* name) {
  if (s.size() != 3) throw std::invalid_argument(std::string(name) + " strides must be 3 ints");
  return {s[0], s[1], s[2]};
}

void attention(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o, int64_t B,
               int64_t H, int64_t N, int64_t M, int64_t D, const std::vector<int64_t>& qs,
               const std::vector<int64_t>& ks, const std::vector<int64_t>& vs,
               const std::vector<int64_t>& os, int dtype, std::uintptr_t stream) {
  auto q3 = strides3(qs, "q"), k3 = strides3(ks, "k"), v3 = strides3(vs, "v"), o3 = strides3(os, "o");
  py::gil_scoped_release release;
  sdfast_cuda::attention(q, k, v, o, B, H, N, M, D, q3.data(), k3.data(), v3.data(), o3.data(),
                         dtype, stream);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "sdfast CUDA kernels (torch-free: raw pointers, sizes, strides, stream)";
  m.attr("MAX_HEAD_DIM") = kMaxHeadDim;
  m.def("group_norm", &sdfast_cuda::group_norm, py::arg("x"), py::arg("y"), py::arg("weight"),
        py::arg("bias"), py::arg("add"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("G"),
        py::arg("stride_b"), py::arg("stride_c"), py::arg("stride_s"), py::arg("add_stride_b"),
        py::arg("add_stride_c"), py::arg("eps"), py::arg("has_add"), py::arg("silu"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"),
        py::arg("B"), py::arg("H"), py::arg("N"), py::arg("M"), py::arg("D"), py::arg("q_strides"),
        py::arg("k_strides"), py::arg("v_strides"), py::arg("o_strides"), py::arg("dtype"),
        py::arg("stream"));
  m.def("lora_merge", &sdfast_cuda::lora_merge, py::arg("w"), py::arg("up"), py::arg("down"),
        py::arg("scale"), py::arg("O"), py::arg("I"), py::arg("R"), py::arg("stride_w"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
