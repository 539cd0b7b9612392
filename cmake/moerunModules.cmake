# One CMake target per module of src/, and the libraries made of them.
#
# Each src/<module>/CMakeLists.txt is one call:
#
#   moe_add_module(layer
#     SOURCES layer.c                  # the module's .c files
#     DEPS comm experts router         # modules whose headers it includes itself
#     LIBS moe_blas                    # external libraries whose headers it includes
#     PUBLIC_HEADERS layer.h)          # headers installed as <moerun/layer/layer.h>
#
# and src/cli adds EXECUTABLE moe. A library module becomes the OBJECT
# library moe_<module>; moe_finalize_modules() (end of src/CMakeLists.txt)
# then
#   - checks the graph: every DEPS entry is a library module, no cycles;
#   - gives each module an include directory of its own,
#     build/module-include/<module>/, holding one symbolic link per module
#     it may include (itself and everything DEPS reaches), so an
#     `#include "x/y.h"` of any other module does not compile: the build
#     refuses upward includes while sources keep the "module/file.h"
#     spelling relative to src/;
#   - builds libmoerun twice from the same position-independent objects:
#     moerun_static (libmoerun.a) and moerun_shared (libmoerun.so, exporting
#     moe_* only), plus the in-tree target `moerun` (tests and tools: the
#     static library, every module header under src/, every external
#     library);
#   - stages the public headers as build/include/moerun/<module>/<h>, with
#     their includes rewritten to <moerun/...> (a public header including
#     a private one stops the build), and compiles each alone as strict
#     C11 (moerun_header_check);
#   - writes build/moerun-modules.txt, the graph that the test
#     module_includes holds every #include of src/ and docs/design.md to.
# A module's external LIBS propagate to the modules that depend on it
# (their headers may include the library's), so DEPS + LIBS are all a
# module lists; the test demands that they are exactly what it includes.

set(MOE_MODULE_INCLUDE_ROOT ${PROJECT_BINARY_DIR}/module-include)
set(MOE_PUBLIC_INCLUDE_DIR ${PROJECT_BINARY_DIR}/include)

# External header -> the target that provides it. Modules name the target
# in LIBS when they include the header; public headers that include one make
# it a public dependency of libmoerun.
set(MOE_EXTERNAL_HEADERS
  "mpi.h=MPI::MPI_C"
  "hdf5.h=HDF5::HDF5"
  "cblas.h=moe_blas"
  "ini.h=PkgConfig::INIH"
  "cjson/cJSON.h=PkgConfig::CJSON"
  "pcre2.h=PkgConfig::PCRE2"
  "pthread.h=Threads::Threads")

function(moe_add_module name)
  cmake_parse_arguments(PARSE_ARGV 1 M "" "EXECUTABLE" "SOURCES;DEPS;LIBS;PUBLIC_HEADERS")
  set(where "${CMAKE_CURRENT_LIST_FILE}: moe_add_module(${name})")
  if(M_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "${where}: unexpected arguments '${M_UNPARSED_ARGUMENTS}' "
                        "(expected SOURCES, DEPS, LIBS, PUBLIC_HEADERS, EXECUTABLE)")
  endif()
  if(NOT M_SOURCES)
    message(FATAL_ERROR "${where}: no SOURCES")
  endif()
  get_property(known GLOBAL PROPERTY MOE_MODULES)
  if(name IN_LIST known)
    message(FATAL_ERROR "${where}: module '${name}' is declared twice")
  endif()
  foreach(lib IN LISTS M_LIBS)
    if(lib MATCHES "^moe_" AND NOT lib STREQUAL "moe_blas")
      message(FATAL_ERROR "${where}: LIBS names '${lib}': modules go in DEPS (by module name)")
    endif()
  endforeach()

  if(M_EXECUTABLE)
    add_executable(${M_EXECUTABLE} ${M_SOURCES})
    set(tgt ${M_EXECUTABLE})
    target_link_libraries(${tgt} PRIVATE moerun_static ${M_LIBS})
  else()
    set(tgt moe_${name})
    add_library(${tgt} OBJECT ${M_SOURCES})
    # The same objects go into the static and the shared library. With
    # -fPIC a compiler must assume any global function may be replaced at
    # run time (ELF interposition) and stops inlining them; moerun does not
    # support replacing its own functions, so it says so.
    set_property(TARGET ${tgt} PROPERTY POSITION_INDEPENDENT_CODE ON)
    target_compile_options(${tgt} PRIVATE -fno-semantic-interposition)
    # Usage requirements (include paths of the external libraries) flow to
    # the modules that depend on this one; linking OBJECT libraries to each
    # other moves no object files.
    set(deps)
    foreach(d IN LISTS M_DEPS)
      list(APPEND deps moe_${d})
    endforeach()
    target_link_libraries(${tgt} PUBLIC ${M_LIBS} ${deps})
  endif()
  set_target_properties(${tgt} PROPERTIES C_STANDARD 11 C_STANDARD_REQUIRED ON C_EXTENSIONS ON)
  target_include_directories(${tgt} PRIVATE ${MOE_MODULE_INCLUDE_ROOT}/${name})
  target_link_libraries(${tgt} PRIVATE moe_options)

  set_property(GLOBAL APPEND PROPERTY MOE_MODULES ${name})
  set_property(GLOBAL PROPERTY MOE_MODULE_${name}_TARGET ${tgt})
  set_property(GLOBAL PROPERTY MOE_MODULE_${name}_EXECUTABLE "${M_EXECUTABLE}")
  set_property(GLOBAL PROPERTY MOE_MODULE_${name}_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  set_property(GLOBAL PROPERTY MOE_MODULE_${name}_DEPS "${M_DEPS}")
  set_property(GLOBAL PROPERTY MOE_MODULE_${name}_LIBS "${M_LIBS}")
  set(headers)
  foreach(h IN LISTS M_PUBLIC_HEADERS)
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${h})
      message(FATAL_ERROR "${where}: PUBLIC_HEADERS names '${h}', which is not in ${CMAKE_CURRENT_SOURCE_DIR}")
    endif()
    list(APPEND headers ${name}/${h})
  endforeach()
  set_property(GLOBAL APPEND PROPERTY MOE_PUBLIC_HEADERS ${headers})
endfunction()

# Every module `m` reaches through DEPS, into out (no duplicates). `stack`
# holds the path that led to m, to name a cycle.
function(_moe_module_closure m stack out)
  get_property(deps GLOBAL PROPERTY MOE_MODULE_${m}_DEPS)
  get_property(dir GLOBAL PROPERTY MOE_MODULE_${m}_DIR)
  set(result)
  foreach(d IN LISTS deps)
    if(d STREQUAL m OR d IN_LIST stack)
      string(JOIN " -> " path ${stack} ${m} ${d})
      message(FATAL_ERROR "module dependency cycle: ${path} (DEPS in src/*/CMakeLists.txt)")
    endif()
    get_property(d_dir GLOBAL PROPERTY MOE_MODULE_${d}_DIR)
    get_property(d_exe GLOBAL PROPERTY MOE_MODULE_${d}_EXECUTABLE)
    if(NOT d_dir)
      message(FATAL_ERROR "${dir}/CMakeLists.txt: DEPS names '${d}', which is not a module of src/")
    endif()
    if(d_exe)
      message(FATAL_ERROR "${dir}/CMakeLists.txt: DEPS names '${d}', the executable ${d_exe}, not a library module")
    endif()
    _moe_module_closure(${d} "${stack};${m}" sub)
    list(APPEND result ${d} ${sub})
  endforeach()
  list(REMOVE_DUPLICATES result)
  set(${out} "${result}" PARENT_SCOPE)
endfunction()

# build/module-include/<m>/<d> -> src/<d> for m and every module it reaches.
# Links left from an earlier configuration (a dependency removed) are
# deleted one by one: nothing is removed recursively through a link.
function(_moe_module_include_dir m allowed)
  list(REMOVE_ITEM allowed "")
  set(dir ${MOE_MODULE_INCLUDE_ROOT}/${m})
  file(MAKE_DIRECTORY ${dir})
  file(GLOB entries LIST_DIRECTORIES true ${dir}/*)
  foreach(e IN LISTS entries)
    get_filename_component(e_name ${e} NAME)
    if(IS_SYMLINK ${e} AND NOT e_name IN_LIST allowed)
      file(REMOVE ${e})
    endif()
  endforeach()
  foreach(d IN LISTS allowed)
    get_property(d_dir GLOBAL PROPERTY MOE_MODULE_${d}_DIR)
    set(current)
    if(IS_SYMLINK ${dir}/${d})
      file(READ_SYMLINK ${dir}/${d} current)
    endif()
    if(NOT current STREQUAL d_dir)
      file(REMOVE ${dir}/${d})
      file(CREATE_LINK ${d_dir} ${dir}/${d} SYMBOLIC)
    endif()
  endforeach()
endfunction()

# Public headers: staged copies under build/include/moerun/ (rewritten
# includes), each compiled alone as strict C11 against only what the
# exported moerun::moerun provides.
function(_moe_stage_public_headers)
  get_property(headers GLOBAL PROPERTY MOE_PUBLIC_HEADERS)
  set(list_file ${PROJECT_BINARY_DIR}/moerun-public-headers.txt)
  string(JOIN "\n" text ${headers})
  file(CONFIGURE OUTPUT ${list_file} CONTENT "${text}\n" @ONLY)
  set(staged)
  set(checks)
  foreach(h IN LISTS headers)
    string(REGEX MATCH "^[^/]+" m ${h})
    get_filename_component(h_name ${h} NAME)
    get_property(m_dir GLOBAL PROPERTY MOE_MODULE_${m}_DIR)
    set(out ${MOE_PUBLIC_INCLUDE_DIR}/moerun/${h})
    add_custom_command(OUTPUT ${out}
      COMMAND ${CMAKE_COMMAND} -DIN=${m_dir}/${h_name} -DOUT=${out} -DNAME=${h} -DPUBLIC=${list_file}
              -P ${PROJECT_SOURCE_DIR}/cmake/moeStageHeader.cmake
      DEPENDS ${m_dir}/${h_name} ${list_file} ${PROJECT_SOURCE_DIR}/cmake/moeStageHeader.cmake
      COMMENT "Public header moerun/${h}" VERBATIM)
    list(APPEND staged ${out})
    string(MAKE_C_IDENTIFIER ${h} id)
    set(check ${PROJECT_BINARY_DIR}/header-check/${id}.c)
    # Twice: the include guard works; the declaration keeps the unit non-empty.
    file(CONFIGURE OUTPUT ${check} CONTENT
      "#include <moerun/${h}>\n#include <moerun/${h}>\nint moe_header_check_${id};\n" @ONLY)
    list(APPEND checks ${check})
    install(FILES ${out} DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/moerun/${m} COMPONENT development)
  endforeach()
  list(APPEND checks ${PROJECT_BINARY_DIR}/header-check/version.c)
  file(CONFIGURE OUTPUT ${PROJECT_BINARY_DIR}/header-check/version.c CONTENT
    "#include <moerun/version.h>\nint moe_header_check_version = MOERUN_VERSION_MAJOR;\n" @ONLY)
  add_custom_target(moerun_headers ALL DEPENDS ${staged})
  set_property(GLOBAL PROPERTY MOE_STAGED_HEADERS ${staged})

  add_library(moerun_header_check OBJECT ${checks})
  add_dependencies(moerun_header_check moerun_headers)
  set_target_properties(moerun_header_check PROPERTIES C_STANDARD 11 C_STANDARD_REQUIRED ON C_EXTENSIONS OFF)
  target_compile_options(moerun_header_check PRIVATE -Wall -Wextra -Wpedantic -Werror)
  target_link_libraries(moerun_header_check PRIVATE moerun_shared)
endfunction()

function(moe_finalize_modules)
  get_property(modules GLOBAL PROPERTY MOE_MODULES)
  set(objects)
  set(all_libs)
  set(graph "# Generated by cmake/moerunModules.cmake: the module graph of src/.\n")
  foreach(e IN LISTS MOE_EXTERNAL_HEADERS)
    string(REPLACE "=" " " e "${e}")
    string(APPEND graph "external ${e}\n")
  endforeach()
  foreach(m IN LISTS modules)
    _moe_module_closure(${m} "" reach)
    _moe_module_include_dir(${m} "${m};${reach}")
    set_property(GLOBAL PROPERTY MOE_MODULE_${m}_REACH "${reach}")
    get_property(tgt GLOBAL PROPERTY MOE_MODULE_${m}_TARGET)
    get_property(exe GLOBAL PROPERTY MOE_MODULE_${m}_EXECUTABLE)
    get_property(dir GLOBAL PROPERTY MOE_MODULE_${m}_DIR)
    get_property(deps GLOBAL PROPERTY MOE_MODULE_${m}_DEPS)
    get_property(libs GLOBAL PROPERTY MOE_MODULE_${m}_LIBS)
    file(RELATIVE_PATH rel ${PROJECT_SOURCE_DIR} ${dir})
    string(JOIN "," deps_csv ${deps})
    string(JOIN "," libs_csv ${libs})
    string(APPEND graph "module ${m} ${rel} deps=${deps_csv} libs=${libs_csv}\n")
    if(exe)
      # An executable takes the include paths of everything it reaches
      # from the libraries, not its objects (they are in libmoerun).
      foreach(d IN LISTS reach)
        get_property(d_libs GLOBAL PROPERTY MOE_MODULE_${d}_LIBS)
        target_link_libraries(${tgt} PRIVATE ${d_libs})
      endforeach()
    else()
      list(APPEND objects $<TARGET_OBJECTS:${tgt}>)
      list(APPEND all_libs ${libs})
    endif()
  endforeach()
  list(APPEND all_libs Threads::Threads m)
  list(REMOVE_DUPLICATES all_libs)
  file(CONFIGURE OUTPUT ${PROJECT_BINARY_DIR}/moerun-modules.txt CONTENT "${graph}" @ONLY)

  # External libraries whose headers a public header includes are public
  # dependencies of libmoerun; the others are its private business.
  get_property(headers GLOBAL PROPERTY MOE_PUBLIC_HEADERS)
  set(public_libs)
  foreach(h IN LISTS headers)
    string(REGEX MATCH "^[^/]+" m ${h})
    get_filename_component(h_name ${h} NAME)
    get_property(m_dir GLOBAL PROPERTY MOE_MODULE_${m}_DIR)
    file(STRINGS ${m_dir}/${h_name} incs REGEX "^[ \t]*#[ \t]*include[ \t]*<")
    foreach(e IN LISTS MOE_EXTERNAL_HEADERS)
      string(REPLACE "=" ";" e "${e}")
      list(GET e 0 e_h)
      list(GET e 1 e_lib)
      string(REPLACE "." "[.]" e_re "${e_h}")
      if(incs MATCHES "<${e_re}>")
        list(APPEND public_libs ${e_lib})
      endif()
    endforeach()
  endforeach()
  list(REMOVE_DUPLICATES public_libs)
  set(private_libs ${all_libs})
  if(public_libs)
    list(REMOVE_ITEM private_libs ${public_libs})
  endif()
  set_property(GLOBAL PROPERTY MOE_PUBLIC_LIBS "${public_libs}")
  set_property(GLOBAL PROPERTY MOE_PRIVATE_LIBS "${private_libs}")

  set(public_includes $<BUILD_INTERFACE:${MOE_PUBLIC_INCLUDE_DIR}> $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  add_library(moerun_static STATIC ${objects})
  add_library(moerun_shared SHARED ${objects})
  foreach(t moerun_static moerun_shared)
    set_target_properties(${t} PROPERTIES OUTPUT_NAME moerun)
    target_include_directories(${t} INTERFACE ${public_includes})
    target_compile_features(${t} INTERFACE c_std_11)
    target_link_libraries(${t} PUBLIC ${public_libs} PRIVATE ${private_libs})
  endforeach()
  # the sanitizers' link options (a static library is not linked)
  target_link_libraries(moerun_shared PRIVATE moe_options)
  set_target_properties(moerun_static PROPERTIES EXPORT_NAME moerun_static)
  # moerun::moerun is the shared library. Its soname carries the minor
  # version while the major is 0 (every 0.x may change the ABI), the
  # version script exports moe_* only, and internal calls bind inside the
  # library (-Bsymbolic-functions) as they do in the static one.
  if(PROJECT_VERSION_MAJOR EQUAL 0)
    set(soversion 0.${PROJECT_VERSION_MINOR})
  else()
    set(soversion ${PROJECT_VERSION_MAJOR})
  endif()
  set_target_properties(moerun_shared PROPERTIES EXPORT_NAME moerun
    VERSION ${PROJECT_VERSION} SOVERSION ${soversion}
    LINK_DEPENDS ${PROJECT_SOURCE_DIR}/cmake/moerun.map)
  target_link_options(moerun_shared PRIVATE
    -Wl,--version-script=${PROJECT_SOURCE_DIR}/cmake/moerun.map -Wl,--no-undefined -Wl,-Bsymbolic-functions)
  add_library(moerun::moerun ALIAS moerun_shared)
  add_library(moerun::moerun_static ALIAS moerun_static)

  # In-tree consumers (tests, benchmarks, fuzzers): the static library with
  # every module's headers, private ones included, and every external
  # library's include paths.
  add_library(moerun INTERFACE)
  target_link_libraries(moerun INTERFACE moerun_static ${all_libs} moe_options)
  target_include_directories(moerun INTERFACE ${PROJECT_SOURCE_DIR}/src)

  _moe_stage_public_headers()
endfunction()
