# CTest driver (cmake -P) for the sapattn CMake package, as a user meets it. MODE:
#   installed  - `cmake --install` BUILD_DIR into a fresh prefix, check the files a user needs are
#                there, configure examples/consumer against that prefix alone (find_package), build
#                it, run it and check its output, including the CUDA backend where it was built;
#   subproject - configure examples/consumer with sapattn as add_subdirectory (CPU-only, so that it
#                is quick) and check that only the libraries come along: no tests, CLI, benchmarks,
#                torch extension or install rules.
# Any failed step is a FATAL_ERROR, which fails the test.
foreach(var MODE SOURCE_DIR BUILD_DIR WORK_DIR GENERATOR CXX)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check_package.cmake: -D${var}=... is required")
  endif()
endforeach()

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (exit ${rc}):\n${out}\n${err}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(consumer_args -S ${SOURCE_DIR}/examples/consumer -B ${WORK_DIR}/consumer -G ${GENERATOR}
                  -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Release)
if(SANITIZE)
  # The sanitizer builds' libraries need the sanitizer runtime at link time.
  list(APPEND consumer_args "-DCMAKE_CXX_FLAGS=-fsanitize=${SANITIZE}" "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=${SANITIZE}")
endif()

if(MODE STREQUAL "installed")
  set(prefix ${WORK_DIR}/prefix)
  run_step("cmake --install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
  foreach(f include/sapattn/ops.hpp include/sapattn/layout.hpp include/sapattn/svg2.hpp lib/libsapattn_ops.a
            lib/cmake/sapattn/sapattnConfig.cmake lib/cmake/sapattn/sapattnConfigVersion.cmake
            lib/cmake/sapattn/sapattnTargets.cmake)
    if(NOT EXISTS ${prefix}/${f})
      message(FATAL_ERROR "the install has no ${f}")
    endif()
  endforeach()
  if(CUDA_ROOT)
    list(APPEND consumer_args -DCUDAToolkit_ROOT=${CUDA_ROOT})
  endif()
  # The prefix alone: CMAKE_FIND_USE_PACKAGE_REGISTRY off, so nothing else can answer find_package.
  run_step("configuring examples/consumer against ${prefix}" ${CMAKE_COMMAND} ${consumer_args}
           -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
  run_step("building examples/consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/consumer)
  run_step("running sapattn_consumer" ${WORK_DIR}/consumer/sapattn_consumer)
  if(HAS_CUDA)
    set(expected "backends: cpu cuda")
  else()
    set(expected "backends: cpu\\)")
  endif()
  if(NOT step_output MATCHES "dense attention matches the reference.*${expected}")
    message(FATAL_ERROR "sapattn_consumer printed '${step_output}', expected '... ${expected}'")
  endif()
  message(STATUS "${step_output}")
elseif(MODE STREQUAL "subproject")
  run_step("configuring examples/consumer with add_subdirectory" ${CMAKE_COMMAND} ${consumer_args}
           -DSAPATTN_SOURCE_DIR=${SOURCE_DIR} -DSAPATTN_CUDA=OFF)
  if(NOT step_output MATCHES "PyTorch extension OFF")
    message(FATAL_ERROR "a subproject sapattn must leave the torch extension out:\n${step_output}")
  endif()
  # Ninja's `help` lists only phony targets (a top-level executable is a file, not listed): ask
  # ninja itself for every target there.
  if(GENERATOR MATCHES "Ninja")
    run_step("listing the targets" ${CMAKE_COMMAND} --build ${WORK_DIR}/consumer -- -t targets all)
  else()
    run_step("listing the targets" ${CMAKE_COMMAND} --build ${WORK_DIR}/consumer --target help)
  endif()
  if(NOT step_output MATCHES "sapattn_consumer" OR NOT step_output MATCHES "sapattn_ops")
    message(FATAL_ERROR "the consumer or sapattn's libraries are missing from the build:\n${step_output}")
  endif()
  foreach(extra sapattn_cli test_core sapattn_torch sapattn_bench_ops install)
    if(step_output MATCHES "(^|\n)(\\.\\.\\. )?${extra}(:|\n)")  # Makefile or Ninja listing
      message(FATAL_ERROR "a subproject sapattn must leave ${extra} out:\n${step_output}")
    endif()
  endforeach()
else()
  message(FATAL_ERROR "check_package.cmake: MODE must be installed or subproject, not '${MODE}'")
endif()
