// Python bindings of the engine (lorecomm._C.Engine), see engine.h and
// lorecomm/engine.py. Compiled against torch's bundled pybind11, so the
// c10d.ProcessGroup and Tensor objects cast, and Futures are handed to Python
// as torch._C.Future through torch's own converter (toPyObject).
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>

#include <Python.h>

#include <thread>

#include "engine.h"
#include "pybind_registry.h"

namespace py = pybind11;
using lorecomm::engine::BatchSpec;
using lorecomm::engine::Engine;
using lorecomm::engine::Job;
using lorecomm::engine::Phase;

namespace {

c10::intrusive_ptr<c10d::ProcessGroup> process_group_from(const py::object& obj) {
  c10d::ProcessGroup* raw = nullptr;
  try {
    raw = obj.cast<c10d::ProcessGroup*>();
  } catch (const py::cast_error&) {
    throw py::type_error("lorecomm._C.Engine needs a torch.distributed.ProcessGroup, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  TORCH_CHECK(raw != nullptr, "lorecomm._C.Engine: process group is None");
  return c10::intrusive_ptr<c10d::ProcessGroup>::unsafe_reclaim_from_nonowning(raw);
}

py::object to_python(c10::intrusive_ptr<c10::ivalue::Future> fut) {
  return torch::jit::toPyObject(c10::IValue(std::move(fut)));
}

void stop(Engine& e) {
  if (PyGILState_Check()) {
    py::gil_scoped_release nogil;  // the worker may need the GIL (Python kernels, callbacks)
    e.shutdown();
  } else {
    e.shutdown();
  }
}

struct EngineDeleter {
  void operator()(Engine* e) const {
    if (e->on_worker_thread()) {
      // last reference dropped inside a Future callback on the worker itself:
      // let the worker finish this job, then stop and free it from another thread
      std::thread([e] {
        e->shutdown();
        delete e;
      }).detach();
      return;
    }
    stop(*e);
    delete e;
  }
};

}  // namespace

LORECOMM_PYBIND(engine) {
  py::class_<Engine, std::unique_ptr<Engine, EngineDeleter>>(m, "Engine", R"doc(
The bucket pipeline engine: runs each bucket's dense or compressed phase on a
worker thread (CPU) / its own CUDA stream (GPU), collectives through the given
c10d process group, ops through torch.ops.lorecomm; futures complete with the
bucket. Use it through lorecomm.engine, not directly.)doc")
      .def(py::init([](const py::object& pg, int64_t timeout_ms) {
             return std::unique_ptr<Engine, EngineDeleter>(
                 new Engine(process_group_from(pg), std::chrono::milliseconds(timeout_ms)));
           }),
           py::arg("process_group"), py::arg("timeout_ms") = 0)
      .def(
          "submit_dense",
          [](Engine& e, at::Tensor buffer, std::string label) {
            Job job;
            job.phase = Phase::Dense;
            job.buffer = std::move(buffer);
            job.label = std::move(label);
            return to_python(e.submit(std::move(job)));
          },
          py::arg("buffer"), py::arg("label") = "")
      .def(
          "submit_compressed",
          [](Engine& e, at::Tensor buffer, const std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t>>& batches,
             std::vector<std::pair<int64_t, int64_t>> dense_ranges, int64_t sketch_k, bool error_feedback,
             std::optional<at::Tensor> ok_out, std::string label) {
            Job job;
            job.phase = Phase::Compressed;
            job.buffer = std::move(buffer);
            for (const auto& [G, E, U, keys, r] : batches) job.batches.push_back(BatchSpec{G, E, U, keys, r});
            job.dense_ranges = std::move(dense_ranges);
            job.sketch_k = sketch_k;
            job.error_feedback = error_feedback;
            job.ok_out = std::move(ok_out);
            job.label = std::move(label);
            return to_python(e.submit(std::move(job)));
          },
          py::arg("buffer"), py::arg("batches"), py::arg("dense_ranges"), py::arg("sketch_k") = 0,
          py::arg("error_feedback") = true, py::arg("ok_out") = py::none(), py::arg("label") = "")
      .def(
          "submit_selected",
          [](Engine& e, at::Tensor buffer, const std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>>& batches,
             std::vector<std::pair<int64_t, int64_t>> dense_ranges, bool error_feedback,
             std::optional<at::Tensor> ok_out, std::string label) {
            Job job;
            job.phase = Phase::Compressed;
            job.buffer = std::move(buffer);
            for (const auto& [G, E, U, picks] : batches) {
              BatchSpec b{G, E, U, at::Tensor(), picks.dim() == 2 ? picks.size(1) : 0};
              b.picks = picks;
              job.batches.push_back(std::move(b));
            }
            job.dense_ranges = std::move(dense_ranges);
            job.error_feedback = error_feedback;
            job.ok_out = std::move(ok_out);
            job.label = std::move(label);
            return to_python(e.submit(std::move(job)));
          },
          py::arg("buffer"), py::arg("batches"), py::arg("dense_ranges"), py::arg("error_feedback") = true,
          py::arg("ok_out") = py::none(), py::arg("label") = "",
          "A compressed bucket with given selections: batches of (G, E, U, picks (B, r) int64).")
      .def(
          "submit_refresh",
          [](Engine& e, at::Tensor buffer, const std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor>>& batches,
             bool error_feedback, std::optional<at::Tensor> ok_out, std::optional<at::Tensor> repairs_out,
             std::string label) {
            Job job;
            job.phase = Phase::Refresh;
            job.buffer = std::move(buffer);
            for (const auto& [G, E, U] : batches) job.batches.push_back(BatchSpec{G, E, U});
            job.error_feedback = error_feedback;
            job.ok_out = std::move(ok_out);
            job.repairs_out = std::move(repairs_out);
            job.label = std::move(label);
            return to_python(e.submit(std::move(job)));
          },
          py::arg("buffer"), py::arg("batches"), py::arg("error_feedback") = true, py::arg("ok_out") = py::none(),
          py::arg("repairs_out") = py::none(), py::arg("label") = "",
          "A refresh bucket: batches of (G, E, U); ok_out 0-dim bool, repairs_out (n_batches,) int64 on the CPU.")
      .def("drain", &Engine::drain, py::call_guard<py::gil_scoped_release>(),
           "Block (GIL released) until every queued bucket has finished.")
      .def("reset", &Engine::reset, "Clear the failed state.")
      .def("shutdown", [](Engine& e) { stop(e); })
      .def_property_readonly("jobs_done", &Engine::jobs_done)
      .def_property_readonly("pending", &Engine::pending)
      .def_property_readonly("busy_seconds", &Engine::busy_seconds)
      .def_property_readonly("failure", &Engine::failure)
      .def_property_readonly("world_size", &Engine::world_size)
      .def(
          "timeline",
          [](Engine& e, bool clear) {
            py::list out;
            for (const auto& t : e.timeline(clear))
              out.append(py::make_tuple(t.seq, t.submit_s, t.start_s, t.end_s, t.failed));
            return out;
          },
          py::arg("clear") = false,
          "[(seq, submit_s, start_s, end_s, failed)] in time.monotonic() seconds.")
      .def_static("now", &Engine::now_s, "The engine's clock (== time.monotonic()).");
  m.attr("HAS_ENGINE") = true;
#ifdef LORECOMM_WITH_CUDA
  m.attr("ENGINE_CUDA") = true;
#else
  m.attr("ENGINE_CUDA") = false;
#endif
}
