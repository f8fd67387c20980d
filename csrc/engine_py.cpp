// Python bindings of the engine and its steps (lorecomm._C.Engine, .Batch,
// .DenseStep, .GreedyLoreStep, .RandomLinearStep, .LoreStep, .ConsistencyStep);
// see engine.h and lorecomm/engine.py. Compiled against torch's bundled
// pybind11, so c10d.ProcessGroup and Tensor objects cast, and Futures reach
// Python as torch._C.Future through torch's own converter (toPyObject).
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>

#include <Python.h>

#include <thread>

#include "engine.h"
#include "pybind_registry.h"
#include "steps/steps.h"

namespace py = pybind11;
using lorecomm::engine::Engine;
using lorecomm::engine::Step;
namespace st = lorecomm::steps;

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

bool stop(Engine& e, double grace_s) {
  const auto grace = std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000));
  if (PyGILState_Check()) {
    py::gil_scoped_release nogil;  // the worker may need the GIL (Python kernels, callbacks)
    return e.shutdown(grace);
  }
  return e.shutdown(grace);
}

struct EngineDeleter {
  void operator()(Engine* e) const {
    if (e->on_worker_thread()) {
      // last reference dropped inside a Future callback on the worker itself:
      // let the worker finish this step, then stop and free it from another thread
      std::thread([e] {
        e->shutdown();
        delete e;
      }).detach();
      return;
    }
    stop(*e, 10.0);
    delete e;
  }
};

std::optional<at::ScalarType> dtype_of(const py::object& obj) {
  if (obj.is_none()) return std::nullopt;
  return obj.cast<at::ScalarType>();
}

}  // namespace

LORECOMM_PYBIND(engine) {
  py::class_<Step, std::shared_ptr<Step>>(m, "Step", "One bucket's work for one compressor phase (base class).")
      .def_property_readonly("kind", &Step::kind)
      .def_readwrite("label", &Step::label)
      .def_readwrite("buffer", &Step::buffer)
      .def_readwrite("loss_scale", &Step::loss_scale)
      .def_readonly("bytes_sent", &Step::bytes_sent, "bytes this rank put into collectives (after the step ran)")
      .def_readonly("collectives", &Step::collectives, "collectives this rank issued (after the step ran)")
      .def_readonly("host_seconds", &Step::host_seconds, "host wall time of the step (after it ran)")
      .def("elapsed_seconds", &Step::elapsed_seconds, py::call_guard<py::gil_scoped_release>(),
           "the step's cost: host time on CPU, its time on the engine's stream on CUDA (waits for it)");

  py::class_<st::Batch>(m, "Batch", "Same-shape oriented matrices of one bucket (a plan's batch).")
      .def(py::init([](at::Tensor G, std::optional<at::Tensor> E, at::Tensor ids, int64_t rank,
                       std::optional<at::Tensor> U, std::optional<at::Tensor> Q) {
             st::Batch b;
             b.G = std::move(G);
             if (E) b.E = *E;
             b.ids = std::move(ids);
             b.rank = rank;
             if (U) b.U = *U;
             if (Q) b.Q = *Q;
             return b;
           }),
           py::arg("G"), py::arg("E"), py::arg("ids"), py::arg("rank"), py::arg("U") = py::none(),
           py::arg("Q") = py::none());

  py::class_<st::DenseStep, Step, std::shared_ptr<st::DenseStep>>(m, "DenseStep")
      .def(py::init([](at::Tensor buffer, const py::object& wire, std::vector<st::Batch> flush, bool skip_unused) {
             auto s = std::make_shared<st::DenseStep>();
             s->buffer = std::move(buffer);
             s->wire = dtype_of(wire);
             s->flush = std::move(flush);
             s->skip_unused = skip_unused;
             return s;
           }),
           py::arg("buffer"), py::arg("wire") = py::none(), py::arg("flush") = std::vector<st::Batch>(),
           py::arg("skip_unused") = false)
      .def_readonly("ok", &st::DenseStep::ok)
      .def_readonly("owes", &st::DenseStep::owes);

  py::class_<st::GreedyLoreStep, Step, std::shared_ptr<st::GreedyLoreStep>>(m, "GreedyLoreStep")
      .def(py::init([](bool refresh, at::Tensor buffer, std::vector<st::Batch> batches, st::Ranges dense_ranges,
                       std::string selection, int64_t sketch_k, bool error_feedback, int64_t seed, int64_t step,
                       bool skip_unused) {
             auto s = std::make_shared<st::GreedyLoreStep>();
             s->refresh = refresh;
             s->buffer = std::move(buffer);
             s->batches = std::move(batches);
             s->dense_ranges = std::move(dense_ranges);
             s->selection = std::move(selection);
             s->sketch_k = sketch_k;
             s->error_feedback = error_feedback;
             s->seed = seed;
             s->step = step;
             s->skip_unused = skip_unused;
             s->ok = at::empty({}, s->buffer.options().dtype(at::kBool));
             return s;
           }),
           py::arg("refresh"), py::arg("buffer"), py::arg("batches"), py::arg("dense_ranges"),
           py::arg("selection"), py::arg("sketch_k"), py::arg("error_feedback"), py::arg("seed"), py::arg("step"),
           py::arg("skip_unused") = false)
      .def_readonly("ok", &st::GreedyLoreStep::ok)
      .def_readonly("repairs", &st::GreedyLoreStep::repairs);

  py::class_<st::RandomLinearStep, Step, std::shared_ptr<st::RandomLinearStep>>(m, "RandomLinearStep")
      .def(py::init([](std::string sketch, at::Tensor buffer, std::vector<st::Batch> batches,
                       st::Ranges dense_ranges, bool error_feedback, int64_t seed, int64_t step, bool skip_unused) {
             auto s = std::make_shared<st::RandomLinearStep>();
             s->sketch = std::move(sketch);
             s->buffer = std::move(buffer);
             s->batches = std::move(batches);
             s->dense_ranges = std::move(dense_ranges);
             s->error_feedback = error_feedback;
             s->seed = seed;
             s->step = step;
             s->skip_unused = skip_unused;
             s->ok = at::empty({}, s->buffer.options().dtype(at::kBool));
             return s;
           }),
           py::arg("sketch"), py::arg("buffer"), py::arg("batches"), py::arg("dense_ranges"),
           py::arg("error_feedback"), py::arg("seed"), py::arg("step"), py::arg("skip_unused") = false)
      .def_readonly("ok", &st::RandomLinearStep::ok);

  py::class_<st::LoreStep, Step, std::shared_ptr<st::LoreStep>>(m, "LoreStep")
      .def(py::init([](at::Tensor buffer, std::vector<st::Batch> batches, st::Ranges dense_ranges,
                       const py::object& wire, int64_t explore, int64_t seed, int64_t step, bool skip_unused) {
             auto s = std::make_shared<st::LoreStep>();
             s->buffer = std::move(buffer);
             s->batches = std::move(batches);
             s->dense_ranges = std::move(dense_ranges);
             s->wire = dtype_of(wire).value_or(at::kFloat);
             s->explore = explore;
             s->seed = seed;
             s->step = step;
             s->skip_unused = skip_unused;
             s->ok = at::empty({}, s->buffer.options().dtype(at::kBool));
             return s;
           }),
           py::arg("buffer"), py::arg("batches"), py::arg("dense_ranges"), py::arg("wire"), py::arg("explore"),
           py::arg("seed"), py::arg("step"), py::arg("skip_unused") = false)
      .def_readonly("ok", &st::LoreStep::ok);

  py::class_<st::LoreWarmupStep, Step, std::shared_ptr<st::LoreWarmupStep>>(m, "LoreWarmupStep")
      .def(py::init([](at::Tensor buffer, std::vector<st::Batch> batches, int64_t seed, int64_t step) {
             auto s = std::make_shared<st::LoreWarmupStep>();
             s->buffer = std::move(buffer);
             s->batches = std::move(batches);
             s->seed = seed;
             s->step = step;
             return s;
           }),
           py::arg("buffer"), py::arg("batches"), py::arg("seed"), py::arg("step"));

  py::class_<st::ConsistencyStep, Step, std::shared_ptr<st::ConsistencyStep>>(m, "ConsistencyStep")
      .def(py::init([](at::Tensor buffer, std::vector<at::Tensor> shared) {
             auto s = std::make_shared<st::ConsistencyStep>();
             s->buffer = std::move(buffer);
             s->shared = std::move(shared);
             return s;
           }),
           py::arg("buffer"), py::arg("shared"))
      .def_readonly("repairs", &st::ConsistencyStep::repairs);

  py::class_<Engine, std::unique_ptr<Engine, EngineDeleter>>(m, "Engine", R"doc(
The bucket engine: runs each bucket's compressor step on a worker thread (CPU)
/ its own CUDA stream (GPU), or inline on the caller's thread, collectives
through the given (private) c10d process group, ops through torch.ops.lorecomm;
futures complete with the bucket. Use it through lorecomm.engine.)doc")
      .def(py::init([](const py::object& pg, int64_t timeout_ms, bool inline_mode) {
             return std::unique_ptr<Engine, EngineDeleter>(
                 new Engine(process_group_from(pg), std::chrono::milliseconds(timeout_ms), inline_mode));
           }),
           py::arg("process_group"), py::arg("timeout_ms") = 0, py::arg("inline") = false)
      .def(
          "submit",
          [](Engine& e, std::shared_ptr<Step> step) {
            c10::intrusive_ptr<c10::ivalue::Future> fut;
            {
              // inline steps run here and talk to the backend, whose threads may need the
              // GIL to free tensors: never hold it across a step
              py::gil_scoped_release nogil;
              fut = e.submit(std::move(step));
            }
            return to_python(std::move(fut));
          },
          py::arg("step"), "Queue one step (inline: run it); returns a torch.futures.Future of its bucket.")
      .def("drain", &Engine::drain, py::call_guard<py::gil_scoped_release>(),
           "Block (GIL released) until every queued step has finished.")
      .def("reset", &Engine::reset, "Clear the failed state.")
      .def("shutdown", [](Engine& e, double grace_s) { return stop(e, grace_s); }, py::arg("grace_s") = 10.0,
           "Stop the worker (pending steps fail) and release the group; False if a stuck worker was abandoned.")
      .def_property_readonly("inline", &Engine::inline_mode)
      .def_property_readonly("stopped", &Engine::stopped)
      .def_property_readonly("steps_done", &Engine::steps_done)
      .def_property_readonly("pending", &Engine::pending)
      .def_property_readonly("busy_seconds", &Engine::busy_seconds)
      .def_property_readonly("failure", &Engine::failure)
      .def_property_readonly("world_size", &Engine::world_size)
      .def_property_readonly("backend", &Engine::backend)
      .def("on_worker_thread", &Engine::on_worker_thread)
      .def("set_logging", &Engine::set_logging, py::arg("on"))
      .def(
          "collective_log",
          [](Engine& e, bool clear) {
            py::list out;
            for (const auto& c : e.collective_log(clear))
              out.append(py::make_tuple(c.op, c.numel, std::string(c10::toString(c.dtype)), c.what));
            return out;
          },
          py::arg("clear") = false,
          "[(op, numel, dtype, what)] of every collective the engine issued while logging was on.")
      .def(
          "timeline",
          [](Engine& e, bool clear) {
            py::list out;
            for (const auto& t : e.timeline(clear))
              out.append(py::make_tuple(t.seq, t.submit_s, t.start_s, t.end_s, t.failed));
            return out;
          },
          py::arg("clear") = false, "[(seq, submit_s, start_s, end_s, failed)] in time.monotonic() seconds.")
      .def_static("now", &Engine::now_s, "The engine's clock (== time.monotonic()).");
#ifdef LORECOMM_WITH_CUDA
  m.attr("ENGINE_CUDA") = true;
#else
  m.attr("ENGINE_CUDA") = false;
#endif
}
