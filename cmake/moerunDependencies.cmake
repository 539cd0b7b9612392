# The libraries moerun builds on, found in ONE place: by the build
# (moerun_IN_BUILD: anything missing stops the configuration) and by the
# installed moerunConfig.cmake (find_dependency: anything missing makes
# find_package(moerun) fail with the reason). Defines the imported targets
# the module targets and the exported libmoerun targets name:
#   MPI::MPI_C  HDF5::HDF5 (parallel)  BLAS::BLAS (OpenBLAS)  Threads::Threads
#   PkgConfig::INIH  PkgConfig::CJSON  PkgConfig::PCRE2
# CBLAS declarations come from moerun's own interface target moe_blas
# (top-level CMakeLists.txt), which wraps BLAS::BLAS without modifying it.

macro(_moerun_dependency)
  if(moerun_IN_BUILD)
    find_package(${ARGN} REQUIRED)
  else()
    find_dependency(${ARGN}) # returns from this file on failure
  endif()
endmacro()

macro(_moerun_dependency_failed msg)
  if(moerun_IN_BUILD)
    message(FATAL_ERROR "${msg}")
  else()
    set(moerun_FOUND FALSE)
    set(moerun_NOT_FOUND_MESSAGE "${msg}")
    return()
  endif()
endmacro()

_moerun_dependency(MPI COMPONENTS C)
set(BLA_VENDOR OpenBLAS)
_moerun_dependency(BLAS)
set(HDF5_PREFER_PARALLEL TRUE)
_moerun_dependency(HDF5 COMPONENTS C)
if(NOT HDF5_IS_PARALLEL)
  _moerun_dependency_failed("moerun needs the PARALLEL build of HDF5 (MPI-IO), but CMake found a serial one (${HDF5_C_LIBRARIES}). On Debian install libhdf5-openmpi-dev (launch/install-deps does it).")
endif()
_moerun_dependency(Threads)
_moerun_dependency(PkgConfig)

# Debian ships these three with pkg-config files only.
foreach(dep "INIH;inih;libinih-dev" "CJSON;libcjson;libcjson-dev" "PCRE2;libpcre2-8;libpcre2-dev")
  list(GET dep 0 _moerun_var)
  list(GET dep 1 _moerun_module)
  list(GET dep 2 _moerun_deb)
  if(NOT TARGET PkgConfig::${_moerun_var})
    pkg_check_modules(${_moerun_var} QUIET IMPORTED_TARGET ${_moerun_module})
    if(NOT ${_moerun_var}_FOUND)
      _moerun_dependency_failed("moerun needs ${_moerun_module} (pkg-config module '${_moerun_module}'; on Debian: ${_moerun_deb})")
    endif()
  endif()
endforeach()
