# Wraps Debian's cmocka (pkg-config) in an imported target, and gives tests a
# helper to register MPI tests at a given rank count.
pkg_check_modules(CMOCKA_PC REQUIRED IMPORTED_TARGET cmocka)
add_library(cmocka::cmocka INTERFACE IMPORTED)
target_link_libraries(cmocka::cmocka INTERFACE PkgConfig::CMOCKA_PC)

find_program(MOE_PYTHON3 NAMES python3 PATHS /usr/bin NO_DEFAULT_PATH)
if(NOT MOE_PYTHON3)
  find_program(MOE_PYTHON3 python3 REQUIRED)
endif()

# Oversubscription and root are normal on test machines; neither changes results.
set(MOE_MPIEXEC_FLAGS --oversubscribe)
if("$ENV{USER}" STREQUAL "root" OR "$ENV{HOME}" STREQUAL "/root")
  list(APPEND MOE_MPIEXEC_FLAGS --allow-run-as-root)
endif()

# moe_add_unit_test(NAME SOURCES... ) : one cmocka executable, one ctest.
function(moe_add_unit_test name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE moerun cmocka::cmocka moe_options)
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS unit TIMEOUT 300)
endfunction()

# moe_add_mpi_test(NAME NP COMMAND...) : runs COMMAND under mpiexec with NP ranks.
function(moe_add_mpi_test name np)
  add_test(NAME ${name}
    COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MOE_MPIEXEC_FLAGS}
            ${MPIEXEC_PREFLAGS} ${ARGN} ${MPIEXEC_POSTFLAGS})
  set_tests_properties(${name} PROPERTIES PROCESSORS ${np} LABELS mpi TIMEOUT 300
    ENVIRONMENT "OPENBLAS_NUM_THREADS=1;OMPI_MCA_rmaps_base_oversubscribe=1")
endfunction()

# The AddressSanitizer + UBSan pass of launch/test runs `ctest -L asan`.
# Called at the end of a tests/<module>/CMakeLists.txt: labels every unit
# test of that folder (kernels, bad input, corrupt and truncated files) and
# the tests whose names match the optional regex.
function(moe_label_asan_tests)
  set(pattern "${ARGV0}")
  get_property(dir_tests DIRECTORY PROPERTY TESTS)
  foreach(t IN LISTS dir_tests)
    get_test_property(${t} LABELS labels)
    if("unit" IN_LIST labels OR (pattern AND t MATCHES "${pattern}"))
      set_property(TEST ${t} APPEND PROPERTY LABELS asan)
    endif()
  endforeach()
endfunction()
