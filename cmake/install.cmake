# Install rules and the CMake package. `cmake --install <build> --prefix P` puts
#   P/include/sapattn/*.hpp                        the public headers
#   P/lib/libsapattn_*.a                           the static libraries (CUDA runtime linked statically)
#   P/bin/sapattn                                  the command-line tool, when built
#   P/lib/cmake/sapattn/sapattnConfig*.cmake       find_package(sapattn) -> sapattn::sapattn
# The exported targets keep their in-tree alias names: sapattn::sapattn (the whole engine), its
# parts sapattn::base, ::ops, ::io, ::workload, ::eval, and sapattn::cuda where the CUDA backend was
# built (find_package(sapattn COMPONENTS cuda) insists on it). examples/consumer uses it and
# tests/package/check_package.cmake checks it against a fresh prefix.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(SAPATTN_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/sapattn CACHE STRING
    "Where the sapattn CMake package goes, relative to the prefix")

get_property(_sapattn_libraries GLOBAL PROPERTY SAPATTN_LIBRARIES)  # src/CMakeLists.txt: base, ops, ..., cuda
install(TARGETS sapattn ${_sapattn_libraries}
  EXPORT sapattnTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/sapattn DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
if(SAPATTN_BUILD_CLI)
  install(TARGETS sapattn_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()

install(EXPORT sapattnTargets NAMESPACE sapattn:: DESTINATION ${SAPATTN_INSTALL_CMAKEDIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/sapattnConfig.cmake.in
  ${PROJECT_BINARY_DIR}/sapattnConfig.cmake
  INSTALL_DESTINATION ${SAPATTN_INSTALL_CMAKEDIR})
# 0.x: a minor version may change the API, so only the same minor version is compatible.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/sapattnConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/sapattnConfig.cmake ${PROJECT_BINARY_DIR}/sapattnConfigVersion.cmake
  DESTINATION ${SAPATTN_INSTALL_CMAKEDIR})
