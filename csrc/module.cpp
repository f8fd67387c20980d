// The Python module lorecomm._C. Importing it loads this shared library, which
// registers the torch.ops.lorecomm operators (csrc/ops.cpp, static
// TORCH_LIBRARY registration) and runs every LORECOMM_PYBIND(...) block
// (csrc/pybind_registry.h) to add Python bindings.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "pybind_registry.h"

namespace lorecomm {
namespace {
std::vector<std::pair<std::string, PybindInit>>& pybind_inits() {
  static std::vector<std::pair<std::string, PybindInit>> inits;  // constructed on first use
  return inits;
}
}  // namespace

int register_pybind_init(const char* name, PybindInit fn) {
  pybind_inits().emplace_back(name, fn);
  return 0;
}
}  // namespace lorecomm

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorecomm native extension: torch.ops.lorecomm CPU kernels and bindings";
  auto inits = lorecomm::pybind_inits();
  std::sort(inits.begin(), inits.end(),
            [](const auto& x, const auto& y) { return x.first < y.first; });
  pybind11::list names;
  for (const auto& [name, fn] : inits) {
    fn(m);
    names.append(name);
  }
  m.attr("bindings") = names;
  m.attr("ops") = pybind11::make_tuple("probe_normal", "probe_keys", "score_paper", "score_sketch",
                                       "range_sketch", "project_residual", "decompress", "refresh_basis");
}
