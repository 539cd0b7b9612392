# What `cmake --install` puts where, and the Debian packages (CPack).
#
#   bin/moe                                   the command (libmoerun linked in statically)
#   lib/libmoerun.so.<soversion>, .so         moerun::moerun (exports moe_* only)
#   lib/libmoerun.a                           moerun::moerun_static
#   include/moerun/<module>/<header>.h        public headers: #include <moerun/layer/layer.h>
#   include/moerun/version.h                  MOERUN_VERSION
#   lib/cmake/moerun/moerunConfig*.cmake      find_package(moerun) (finds MPI, HDF5, BLAS ...)
#   lib/pkgconfig/moerun.pc                   pkg-config moerun (relocatable)
#   share/man/man1/moe*.1                     moe(1) and a page per command, from their --help
#   share/doc/moerun/                         README, docs, examples/
#
# Components: `runtime` (the command, the shared library, man pages, docs)
# and `development` (headers, static library, CMake and pkg-config files,
# examples), packaged as moerun and moerun-dev.
include(CMakePackageConfigHelpers)
set(MOE_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/moerun)

install(TARGETS moe RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT runtime)
install(TARGETS moerun_shared moerun_static moe_blas EXPORT moerunTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT runtime NAMELINK_COMPONENT development
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT development)
install(EXPORT moerunTargets NAMESPACE moerun:: DESTINATION ${MOE_CMAKE_DIR} COMPONENT development)
install(FILES ${PROJECT_BINARY_DIR}/include/moerun/version.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/moerun COMPONENT development)
# (the module headers are installed by moe_finalize_modules, which stages them)

# ---- find_package(moerun) ----
configure_package_config_file(cmake/moerunConfig.cmake.in ${PROJECT_BINARY_DIR}/moerunConfig.cmake
  INSTALL_DESTINATION ${MOE_CMAKE_DIR})
# 0.x: a minor release may change the API, so only the same minor matches.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/moerunConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/moerunConfig.cmake ${PROJECT_BINARY_DIR}/moerunConfigVersion.cmake
  cmake/moerunDependencies.cmake DESTINATION ${MOE_CMAKE_DIR} COMPONENT development)

# ---- pkg-config: Requires from the same public/private split as the
# CMake targets (a public header including mpi.h makes MPI public) ----
set(moe_pc_names "MPI::MPI_C=ompi-c" "HDF5::HDF5=hdf5-openmpi" "moe_blas=openblas"
  "PkgConfig::INIH=inih" "PkgConfig::CJSON=libcjson" "PkgConfig::PCRE2=libpcre2-8")
function(_moe_pc_requires libs out)
  set(result)
  foreach(lib IN LISTS libs)
    foreach(pair IN LISTS moe_pc_names)
      string(REPLACE "=" ";" pair "${pair}")
      list(GET pair 0 target)
      list(GET pair 1 pc)
      if(lib STREQUAL target)
        list(APPEND result ${pc})
      endif()
    endforeach()
  endforeach()
  string(JOIN ", " result ${result})
  set(${out} "${result}" PARENT_SCOPE)
endfunction()
get_property(moe_public_libs GLOBAL PROPERTY MOE_PUBLIC_LIBS)
get_property(moe_private_libs GLOBAL PROPERTY MOE_PRIVATE_LIBS)
_moe_pc_requires("${moe_public_libs}" MOE_PC_REQUIRES)
_moe_pc_requires("${moe_private_libs}" MOE_PC_REQUIRES_PRIVATE)
# prefix relative to the .pc file, so the same file serves any install prefix
file(RELATIVE_PATH MOE_PC_PREFIX_REL /prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig /prefix)
configure_file(cmake/moerun.pc.in ${PROJECT_BINARY_DIR}/moerun.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/moerun.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig COMPONENT development)

# ---- man pages, written by the freshly built moe from its own --help and
# the key table (moe help --man-dir); regenerated whenever moe changes ----
set(MOE_MAN_DIR ${PROJECT_BINARY_DIR}/man)
add_custom_command(OUTPUT ${MOE_MAN_DIR}/moe.1
  COMMAND ${CMAKE_COMMAND} -E rm -rf ${MOE_MAN_DIR}
  COMMAND ${CMAKE_COMMAND} -E env ASAN_OPTIONS=detect_leaks=0 $<TARGET_FILE:moe> help --man-dir ${MOE_MAN_DIR}
  DEPENDS moe COMMENT "Man pages from moe's help" VERBATIM)
add_custom_target(moe_man ALL DEPENDS ${MOE_MAN_DIR}/moe.1)
install(DIRECTORY ${MOE_MAN_DIR}/ DESTINATION ${CMAKE_INSTALL_MANDIR}/man1 COMPONENT runtime
  FILES_MATCHING PATTERN "*.1")

# ---- documentation and examples ----
install(FILES README.md DESTINATION ${CMAKE_INSTALL_DOCDIR} COMPONENT runtime)
install(DIRECTORY docs/ DESTINATION ${CMAKE_INSTALL_DOCDIR}/docs COMPONENT runtime)
install(DIRECTORY examples/ DESTINATION ${CMAKE_INSTALL_DOCDIR}/examples COMPONENT development)

# ---- Debian packages: cpack -G DEB (launch/package-test deb) ----
set(CPACK_PACKAGE_NAME moerun)
set(CPACK_PACKAGE_VENDOR "moerun")
set(CPACK_PACKAGE_CONTACT "moerun maintainers <moerun@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "${PROJECT_DESCRIPTION}")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_GENERATOR DEB)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL runtime development)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION science)
set(CPACK_DEBIAN_RUNTIME_PACKAGE_NAME moerun)
set(CPACK_DEBIAN_RUNTIME_PACKAGE_SECTION science)
# Depends of the runtime package from the libraries its ELF files link
# (dpkg-shlibdeps): libopenmpi3, libhdf5-openmpi-103-1, libopenblas0,
# libinih1, libcjson1, libpcre2-8-0, libc6.
set(CPACK_DEBIAN_RUNTIME_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_RUNTIME_PACKAGE_RECOMMENDS "openmpi-bin")
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_NAME moerun-dev)
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_SECTION libdevel)
# moerunConfig.cmake and moerun.pc find these to compile and link against
# libmoerun (the -dev packages of every library it links).
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_DEPENDS
  "moerun (= ${PROJECT_VERSION}), libopenmpi-dev, libhdf5-openmpi-dev, libopenblas-dev, libinih-dev, libcjson-dev, libpcre2-dev, pkg-config")
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)
set(CPACK_OUTPUT_FILE_PREFIX ${PROJECT_BINARY_DIR}/packages)
include(CPack)
