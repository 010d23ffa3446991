# The CUTLASS/CuTe headers that the Hopper attention kernel (src/cuda/attention/attention_sm90.cu) is written
# with. Header-only and private to that one translation unit: the installed package does not need
# them. Looked for, first hit wins:
#   1. SAPATTN_CUTLASS_DIR, when set (a directory that holds cute/tensor.hpp);
#   2. .deps/cutlass/include, where scripts/bootstrap.sh unpacks the nvidia-cutlass wheel;
#   3. $CUTLASS_PATH/include, then the usual prefixes (CMAKE_PREFIX_PATH, /usr/local, ...);
#   4. otherwise fetched at configure time with FetchContent from NVIDIA's repository at the tag
#      below (SAPATTN_FETCH_CUTLASS=OFF forbids it; FETCHCONTENT_SOURCE_DIR_SAPATTN_CUTLASS points
#      it at a local checkout instead). Only the headers are used: CUTLASS's own CMake project is
#      never added to the build.
set(SAPATTN_CUTLASS_VERSION 4.2.0)  # the version of the nvidia-cutlass wheel that bootstrap.sh pins
option(SAPATTN_FETCH_CUTLASS "Download the CUTLASS headers when none are found" ON)

find_path(SAPATTN_CUTLASS_DIR cute/tensor.hpp
  HINTS ${PROJECT_SOURCE_DIR}/.deps/cutlass/include ENV CUTLASS_PATH
  PATH_SUFFIXES include
  DOC "CUTLASS include directory (the one that holds cute/tensor.hpp)")

if(NOT SAPATTN_CUTLASS_DIR)
  if(NOT SAPATTN_FETCH_CUTLASS)
    message(FATAL_ERROR "CUTLASS headers not found and SAPATTN_FETCH_CUTLASS=OFF: set SAPATTN_CUTLASS_DIR "
                        "to a CUTLASS include directory, run scripts/bootstrap.sh, or build without CUDA "
                        "(-DSAPATTN_CUDA=OFF)")
  endif()
  message(STATUS "sapattn: fetching the CUTLASS ${SAPATTN_CUTLASS_VERSION} headers (SAPATTN_FETCH_CUTLASS)")
  include(FetchContent)
  FetchContent_Declare(sapattn_cutlass
    GIT_REPOSITORY https://github.com/NVIDIA/cutlass.git
    GIT_TAG v${SAPATTN_CUTLASS_VERSION}
    GIT_SHALLOW TRUE
    # A folder without a CMakeLists.txt: MakeAvailable downloads but adds nothing to the build.
    SOURCE_SUBDIR include)
  FetchContent_MakeAvailable(sapattn_cutlass)
  set(SAPATTN_CUTLASS_DIR "${sapattn_cutlass_SOURCE_DIR}/include" CACHE PATH
      "CUTLASS include directory (the one that holds cute/tensor.hpp)" FORCE)
endif()

if(NOT EXISTS "${SAPATTN_CUTLASS_DIR}/cute/tensor.hpp")
  message(FATAL_ERROR "SAPATTN_CUTLASS_DIR=${SAPATTN_CUTLASS_DIR} holds no cute/tensor.hpp: point it at a "
                      "CUTLASS include directory, or unset it to search and fetch")
endif()
message(STATUS "sapattn: CUTLASS headers from ${SAPATTN_CUTLASS_DIR}")
