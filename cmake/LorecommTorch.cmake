# Torch (and CUDA, when torch is a CUDA build and a CUDA compiler is found) for lorecomm's native targets:
# the extension (CMakeLists.txt) and the C++ engine tests (csrc/tests), which must agree on both.
#
# Needs Python_EXECUTABLE (find_package(Python) first). Sets LORECOMM_WITH_CUDA and defines
# lorecomm_use_torch(target): torch's headers and libraries, OpenMP, and the CUDA define and headers.
if(COMMAND lorecomm_use_torch)
  return()  # included already (csrc/tests as a subdirectory of the top-level build)
endif()

if(NOT LORECOMM_TORCH_CMAKE_PREFIX)
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import torch; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE LORECOMM_TORCH_CMAKE_PREFIX OUTPUT_STRIP_TRAILING_WHITESPACE
    COMMAND_ERROR_IS_FATAL ANY)
endif()
list(APPEND CMAKE_PREFIX_PATH ${LORECOMM_TORCH_CMAKE_PREFIX})

# CUDA only when torch itself is a CUDA build and a toolkit is present.
set(LORECOMM_WITH_CUDA OFF)
option(LORECOMM_DISABLE_CUDA "never build CUDA sources" OFF)
if(NOT LORECOMM_DISABLE_CUDA)
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import torch; print(int(torch.version.cuda is not None))"
    OUTPUT_VARIABLE LORECOMM_TORCH_HAS_CUDA OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(LORECOMM_TORCH_HAS_CUDA STREQUAL "1")
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      enable_language(CUDA)
      set(LORECOMM_WITH_CUDA ON)
    endif()
  endif()
endif()
message(STATUS "lorecomm: CUDA sources ${LORECOMM_WITH_CUDA}")
if(LORECOMM_WITH_CUDA AND NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
  # torch's FindCUDA guesses the toolkit from nvcc's directory, wrong for a wrapper script on PATH;
  # CMake's CUDA detection asked nvcc itself
  set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
endif()
if(LORECOMM_WITH_CUDA)
  # A toolkit with nvcc alone (pip's nvidia-cuda-nvcc) lacks the libraries torch's CMake links (nvrtc):
  # take them from the nvidia-* wheels installed beside torch, the ones torch itself loads
  file(GLOB LORECOMM_NVIDIA_LIBDIRS "${LORECOMM_TORCH_CMAKE_PREFIX}/../../../nvidia/*/lib")
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
               HINTS "${CUDA_TOOLKIT_ROOT_DIR}/lib64" "${CUDA_TOOLKIT_ROOT_DIR}/lib" ${LORECOMM_NVIDIA_LIBDIRS})
endif()

find_package(Torch REQUIRED)
find_package(OpenMP)   # at::parallel_for is an inline OpenMP region in torch's headers

function(lorecomm_use_torch target)
  # torch/include first: its bundled pybind11 must be the one compiled against,
  # so torch types cast across modules (never the pip pybind11 headers).
  target_include_directories(${target} PRIVATE ${TORCH_INCLUDE_DIRS})
  target_link_libraries(${target} PRIVATE ${TORCH_LIBRARIES})
  if(OpenMP_CXX_FOUND)
    target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
  endif()
  if(LORECOMM_WITH_CUDA)
    target_compile_definitions(${target} PRIVATE LORECOMM_WITH_CUDA=1)
    # ATen/cuda headers include the CUDA libraries' headers (cusparse.h, cublas_v2.h): after the toolkit's,
    # those of the nvidia-* wheels beside torch
    file(GLOB _nvidia_includes "${LORECOMM_TORCH_CMAKE_PREFIX}/../../../nvidia/*/include")
    target_include_directories(${target} SYSTEM AFTER PRIVATE ${_nvidia_includes})
  endif()
endfunction()
