// The main() of the C++ kernel tests (csrc/tests/*.cpp): run_all() once per instruction set
// the library is built for and this CPU supports (the others reported as skipped); exit status
// 0 when at least one instruction set ran and no check counted a failure.
#pragma once
#include <cstdio>

#include "cpu/kernels.h"

inline int run_on_every_isa(void (*run_all)(), const int& failures) {
  int ran = 0;
  for (const char* name : {"avx2", "avx512"}) {
    if (!sdfast::cpu::set_isa(name)) {
      std::printf("-- %s: not built or not supported on this CPU, skipped\n", name);
      continue;
    }
    std::printf("-- %s\n", sdfast::cpu::isa());
    run_all();
    ++ran;
  }
  if (ran == 0) {
    std::printf("FAIL: no instruction set ran, nothing was tested\n");
    return 1;
  }
  std::printf("%d failure(s) in %d instruction set(s)\n", failures, ran);
  return failures == 0 ? 0 : 1;
}
