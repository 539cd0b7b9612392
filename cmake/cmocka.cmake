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

# Called at the end of every tests/<module>/CMakeLists.txt:
# - gives each test of the folder a working directory of its own
#   (build/tests/<module>/cwd/<test>), so tests that run at the same time
#   under `ctest -j` never share a scratch file;
# - labels `asan` (the AddressSanitizer + UBSan pass of launch/test runs
#   `ctest -L asan`) every unit test of the folder (kernels, bad input,
#   corrupt and truncated files) and the tests whose names match the
#   optional regex ASAN;
# - adds the label `equiv` to the tests whose names match the optional regex
#   EQUIV: multi-rank runs held to the single-process result, which .ci/run
#   repeats under every BLAS kernel set.
# Open MPI 4.1 keeps a session directory under /tmp shared by every mpirun
# of the user, and two launches that create it at the same moment can fail
# ("A call to mkdir was unable to create the desired directory", open-mpi
# issue 8510). Each test therefore gets its own session directory base
# (OMPI_MCA_orte_tmpdir_base), short so that paths below it stay short.
string(MD5 MOE_OMPI_TMP_TAG "${CMAKE_BINARY_DIR}")
string(SUBSTRING "${MOE_OMPI_TMP_TAG}" 0 8 MOE_OMPI_TMP_TAG)
set(MOE_OMPI_TMP_ROOT /tmp/moe-ompi-${MOE_OMPI_TMP_TAG})

function(moe_finalize_tests)
  cmake_parse_arguments(ARG "" "ASAN;EQUIV;LABEL" "" ${ARGN})
  get_property(dir_tests DIRECTORY PROPERTY TESTS)
  foreach(t IN LISTS dir_tests)
    set(work ${CMAKE_CURRENT_BINARY_DIR}/cwd/${t})
    file(MAKE_DIRECTORY ${work})
    set_property(TEST ${t} PROPERTY WORKING_DIRECTORY ${work})
    get_property(moe_n GLOBAL PROPERTY MOE_TEST_COUNT)
    if(NOT moe_n)
      set(moe_n 0)
    endif()
    math(EXPR moe_n "${moe_n} + 1")
    set_property(GLOBAL PROPERTY MOE_TEST_COUNT ${moe_n})
    file(MAKE_DIRECTORY ${MOE_OMPI_TMP_ROOT}/${moe_n})
    set_property(TEST ${t} APPEND PROPERTY ENVIRONMENT OMPI_MCA_orte_tmpdir_base=${MOE_OMPI_TMP_ROOT}/${moe_n})
    get_test_property(${t} LABELS labels)
    if(ARG_LABEL)
      set_property(TEST ${t} APPEND PROPERTY LABELS ${ARG_LABEL})
    endif()
    if("unit" IN_LIST labels OR (ARG_ASAN AND t MATCHES "${ARG_ASAN}"))
      set_property(TEST ${t} APPEND PROPERTY LABELS asan)
    endif()
    if(ARG_EQUIV AND t MATCHES "${ARG_EQUIV}")
      set_property(TEST ${t} APPEND PROPERTY LABELS equiv)
    endif()
  endforeach()
endfunction()
