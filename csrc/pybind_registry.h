// Adding pybind11 bindings to the lorecomm._C module from any csrc/*.cpp
// without touching csrc/module.cpp (which owns PYBIND11_MODULE):
//
//   #include "pybind_registry.h"
//   LORECOMM_PYBIND(engine) {          // `m` is the lorecomm._C module
//     pybind11::class_<Engine>(m, "Engine") ... ;
//   }
//
// Registration runs at library load (static initialisers), the bodies run in
// name order when Python imports lorecomm._C. Compile against torch's bundled
// pybind11 (torch/include, as CMakeLists.txt does) so torch types cast.
#pragma once

#include <pybind11/pybind11.h>

namespace lorecomm {

using PybindInit = void (*)(pybind11::module_&);

// Returns a dummy int so it can initialise a static.
int register_pybind_init(const char* name, PybindInit fn);

}  // namespace lorecomm

#define LORECOMM_PYBIND(name)                                                     \
  static void lorecomm_pybind_init_##name(pybind11::module_& m);                  \
  [[maybe_unused]] static const int lorecomm_pybind_reg_##name =                  \
      ::lorecomm::register_pybind_init(#name, &lorecomm_pybind_init_##name);      \
  static void lorecomm_pybind_init_##name(pybind11::module_& m)
