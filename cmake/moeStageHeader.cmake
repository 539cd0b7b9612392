# cmake -DIN=src/<m>/<h> -DOUT=build/include/moerun/<m>/<h> -DNAME=<m>/<h>
#       -DPUBLIC=<file listing the public headers> -P moeStageHeader.cmake
#
# Stages one public header for installation: every `#include "x/y.h"`
# becomes `#include <moerun/x/y.h>` (installed headers live under
# include/moerun/ and must not claim generic names such as config/config.h
# in the user's include path), and including a header that is not public
# stops the build, naming both.
cmake_minimum_required(VERSION 3.25)
foreach(v IN ITEMS IN OUT NAME PUBLIC)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "moeStageHeader.cmake: -D${v}=... missing")
  endif()
endforeach()
file(STRINGS ${PUBLIC} public)
file(READ ${IN} text)
string(REGEX MATCHALL "#[ \t]*include[ \t]*\"[^\"]*\"" includes "${text}")
foreach(inc IN LISTS includes)
  string(REGEX REPLACE "^#[ \t]*include[ \t]*\"([^\"]*)\"$" "\\1" path "${inc}")
  if(NOT path IN_LIST public)
    message(FATAL_ERROR
      "public header ${NAME} includes \"${path}\", which is not public: add it to PUBLIC_HEADERS "
      "of its module (src/<module>/CMakeLists.txt) if users need it, or move the include into a .c file")
  endif()
  string(REPLACE "${inc}" "#include <moerun/${path}>" text "${text}")
endforeach()
file(WRITE ${OUT} "${text}")
