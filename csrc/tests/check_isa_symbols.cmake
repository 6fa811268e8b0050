# ctest: the kernel objects built for one instruction set (csrc/cpu/simd.h) may define only
# symbols whose names involve their own namespace sdfast::cpu::<isa> (its functions, or
# templates instantiated on its types). Any other definition (an out-of-line copy of a std::
# template, say) is shared by name with the other builds, and the linker may keep the AVX-512
# copy for AVX2 callers: an illegal instruction on CPUs without AVX-512.
#   cmake -DNM=<nm> -DISA=<isa> -DOBJECTS=<a;b;...> -P check_isa_symbols.cmake
set(bad "")
foreach(obj ${OBJECTS})
  execute_process(COMMAND ${NM} -C --defined-only ${obj} OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${obj}")
  endif()
  string(REPLACE "\n" ";" lines "${out}")
  foreach(line ${lines})
    # external definitions: T/W/V/u/B/D/R (upper case or weak); local (lower case) ones are private
    if(line MATCHES "^[0-9a-f]+ [TWVuBDRG] (.*)$")
      set(sym "${CMAKE_MATCH_1}")
      string(FIND "${sym}" "sdfast::cpu::${ISA}::" own)
      if(own EQUAL -1 AND NOT sym MATCHES "^DW\\.ref\\.__gxx_personality_v0$")
        list(APPEND bad "${obj}: ${sym}")
      endif()
    endif()
  endforeach()
endforeach()
if(bad)
  string(REPLACE ";" "\n  " bad "${bad}")
  message(FATAL_ERROR "symbols outside sdfast::cpu::${ISA} in the ${ISA} kernel objects:\n  ${bad}")
endif()
message(STATUS "${ISA} kernel objects define only sdfast::cpu::${ISA} symbols")
