// sdfast._C: the CPU kernels, torch-free, behind pybind11.
// Each binding takes buffer addresses (ints), sizes and strides; all input checks live in
// sdfast/ops on the Python side, so nothing here knows about tensors.
#include <pybind11/pybind11.h>

#if defined(__AVX2__)
static constexpr bool kHasAvx2 = true;
#else
static constexpr bool kHasAvx2 = false;
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "sdfast CPU kernels (torch-free)";
  m.attr("built_with_avx2") = kHasAvx2;
#ifdef _OPENMP
  m.attr("built_with_openmp") = true;
#else
  m.attr("built_with_openmp") = false;
#endif
}
