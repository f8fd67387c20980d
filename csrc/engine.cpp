// lorecomm bucket engine: see engine.h.
#include "engine.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef LORECOMM_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cctype>
#include <exception>
#include <sstream>
#include <stdexcept>

namespace lorecomm::engine {
namespace {

// An error that already carries the engine's full message.
struct StageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// the message without the C++ backtrace c10::Error appends
std::string message_of(const std::exception& e) {
  if (const auto* ce = dynamic_cast<const c10::Error*>(&e)) return ce->what_without_backtrace();
  return e.what();
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// What a failed collective most likely means, from the backend's message.
std::string likely_cause(const std::string& raw, bool engine_timeout) {
  const std::string m = lower(raw);
  auto has = [&](const char* s) { return m.find(s) != std::string::npos; };
  if (has("size doesn't match") || has("size mismatch") || has("mismatch") || has("expected size"))
    return "the ranks issued different collectives (their lorecomm configurations, bucket layouts or step "
           "counters differ)";
  if (has("died") || has("connection closed") || has("connection reset") || has("broken pipe") ||
      has("connection refused") || has("end of file"))
    return "a peer rank died or left the group";
  if (engine_timeout || has("timed out") || has("timeout"))
    return "timed out waiting for peers: a rank is slow, stuck, dead, or issued different collectives";
  return "";
}

}  // namespace

struct Item {
  std::shared_ptr<Step> step;
  c10::intrusive_ptr<c10::ivalue::Future> fut;
  at::ThreadLocalState tls;
  int64_t seq = 0;
  double submit_s = 0;
  int intra_threads = 0;  // the submitter's at::get_num_threads(), applied on the worker
#ifdef LORECOMM_WITH_CUDA
  std::shared_ptr<void> ready_event;  // at::cuda::CUDAEvent, type-erased
#endif
};

struct Core {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;  // reset when the engine stops
  int world_size = 0;
  std::string backend;
  std::chrono::milliseconds timeout{0};
  bool inline_mode = false;

  mutable std::mutex mu;
  std::condition_variable cv;         // work available / stop
  std::condition_variable idle_cv;    // queue drained
  std::condition_variable exited_cv;  // the worker left its loop
  std::deque<Item> queue;
  bool running = false, stop = false, exited = false;
  std::atomic<bool> abandoned{false};
  std::thread::id worker_id;
  int64_t next_seq = 0, done = 0;
  double busy_s = 0;
  std::optional<std::string> failure;
  std::vector<TimelineEntry> timeline;
  bool logging = false;
  std::vector<CollectiveRecord> log;
#ifdef LORECOMM_WITH_CUDA
  std::shared_ptr<void> stream;  // c10::cuda::CUDAStream, created lazily per device
  int stream_device = -1;
#endif
};

double Engine::now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ------------------------------------------------------------------- Comm
int Comm::world_size() const { return core_.world_size; }

void Comm::issue(const char* op, const at::Tensor& t, const char* what) {
  auto fail = [&](const std::string& raw, bool engine_timeout) {
    std::ostringstream s;
    s << "lorecomm engine: " << label_ << ": " << what << " " << op << " of " << t.numel() << " "
      << t.scalar_type() << " elements over " << core_.world_size << " ranks (" << core_.backend
      << ") failed: " << raw;
    if (engine_timeout) s << " [engine timeout " << core_.timeout.count() << " ms]";
    const std::string cause = likely_cause(raw, engine_timeout);
    if (!cause.empty()) s << ". Likely cause: " << cause;
    throw StageError(s.str());
  };
  auto pg = core_.pg;
  if (!pg) fail("the engine has been shut down", false);
  // a backend that cannot move this device's tensors is a setup error, not a dead peer
  c10::intrusive_ptr<c10d::Backend> device_backend;
  try {
    device_backend = pg->getBackend(t.device().type());
  } catch (const std::exception& e) {
    fail("the process group has no backend for " + c10::DeviceTypeName(t.device().type(), true) +
             " tensors (put the model on a device its backend supports, e.g. CUDA for NCCL, or use a "
             "Gloo group for CPU training): " + message_of(e),
         false);
  }
  std::string backend;
  try {
    backend = device_backend->getBackendName();
  } catch (const std::exception&) {  // a custom backend may not name itself
  }
  if (lower(backend) == "nccl" && !t.is_cuda())
    fail("NCCL cannot communicate " + c10::DeviceTypeName(t.device().type(), true) +
             " tensors (put the model on its CUDA device, or use a Gloo group for CPU training)",
         false);
  {
    std::lock_guard<std::mutex> g(core_.mu);
    if (core_.logging) core_.log.push_back({op, t.numel(), t.scalar_type(), what});
  }
  std::vector<at::Tensor> v{t};
  bool timed_out = false;
  try {
    c10::intrusive_ptr<c10d::Work> work;
    if (std::string(op) == "broadcast") {
      c10d::BroadcastOptions o;
      o.rootRank = 0;
      work = pg->broadcast(v, o);
    } else {
      c10d::AllreduceOptions o;
      o.reduceOp = std::string(op) == "all_reduce_max" ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
      work = pg->allreduce(v, o);
    }
    if (!work->wait(core_.timeout)) {
      timed_out = true;
      throw std::runtime_error("the collective did not complete in time");
    }
  } catch (const StageError&) {
    throw;
  } catch (const std::exception& e) {
    const std::string raw = message_of(e);
    fail(raw, timed_out || (core_.timeout.count() > 0 && lower(raw).find("timed out") != std::string::npos));
  }
  bytes_ += t.numel() * static_cast<int64_t>(t.element_size());
  ++collectives_;
}

void Comm::all_reduce_mean(const at::Tensor& t, const char* what) {
  t.div_(core_.world_size);
  issue("all_reduce_sum", t, what);
}

void Comm::all_reduce_sum(const at::Tensor& t, const char* what) { issue("all_reduce_sum", t, what); }

void Comm::all_reduce_max(const at::Tensor& t, const char* what) { issue("all_reduce_max", t, what); }

void Comm::broadcast(const at::Tensor& t, const char* what) { issue("broadcast", t, what); }

double Step::elapsed_seconds() const {
#ifdef LORECOMM_WITH_CUDA
  if (device_timing) {
    auto& ev = *std::static_pointer_cast<std::pair<at::cuda::CUDAEvent, at::cuda::CUDAEvent>>(device_timing);
    ev.second.synchronize();
    return ev.first.elapsed_time(ev.second) / 1000.0;
  }
#endif
  return host_seconds;
}

// ----------------------------------------------------------------- running
namespace {

void complete(Core& core, Item& it, const std::exception_ptr& err) {
  if (core.abandoned.load()) return;  // interpreter may be gone: never run callbacks now
  if (err)
    it.fut->setErrorIfNeeded(err);
  else
    it.fut->markCompleted(c10::IValue(it.step->buffer));
}

// Runs one step (on the worker, or inline); never throws.
void run_item(Core& core, Item& it) {
  const double t0 = Engine::now_s();
  Step& step = *it.step;
  std::optional<std::string> prior;
  {
    std::lock_guard<std::mutex> g(core.mu);
    prior = core.failure;
    core.running = true;
  }
  std::exception_ptr err;
#ifdef LORECOMM_WITH_CUDA
  // held until the future is completed below: markCompleted records its events on the current
  // stream, which must be the engine's, so that consumers wait for the step's kernels and collectives
  std::optional<c10::cuda::CUDAStreamGuard> sguard;
#endif
  if (prior) {
    err = std::make_exception_ptr(std::runtime_error(
        "lorecomm engine: " + step.label + " not run: an earlier bucket failed (" + *prior +
        "); the collective sequence of this process group is broken (every rank must call "
        "lorecomm.engine.reset() before training on)"));
  } else {
    try {
      std::optional<at::ThreadLocalStateGuard> tls;
      if (!core.inline_mode) tls.emplace(it.tls);
      if (it.intra_threads > 0 && at::get_num_threads() != it.intra_threads) at::set_num_threads(it.intra_threads);
      try {
        const auto& buf = step.buffer;
        TORCH_CHECK(buf.defined() && buf.dim() == 1 && buf.is_contiguous(),
                    "the bucket must be a contiguous 1-D tensor");
        const auto dt = buf.scalar_type();
        TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "the bucket dtype must be float32, bfloat16 or float16, got ", dt);
        if (step.loss_scale)
          TORCH_CHECK(step.loss_scale->numel() == 1 && step.loss_scale->device() == buf.device(),
                      "loss_scale must be a one-element tensor on the bucket's device");
        step.check();
      } catch (const std::exception& e) {
        throw StageError("lorecomm engine: " + step.label + " (" + step.kind() + "): bad input: " + message_of(e));
      }
#ifdef LORECOMM_WITH_CUDA
      if (step.buffer.is_cuda() && !core.inline_mode) {
        const int dev = step.buffer.device().index();
        if (!core.stream || core.stream_device != dev) {
          core.stream = std::make_shared<c10::cuda::CUDAStream>(
              c10::cuda::getStreamFromPool(/*isHighPriority=*/true, dev));
          core.stream_device = dev;
        }
        auto& s = *std::static_pointer_cast<c10::cuda::CUDAStream>(core.stream);
        std::static_pointer_cast<at::cuda::CUDAEvent>(it.ready_event)->block(s);  // GPU-side wait
        sguard.emplace(s);
        // everything the step touches is used on our stream: the caching
        // allocator must not hand it out again before our work is done
        std::vector<at::Tensor> ts;
        step.tensors(ts);
        if (step.loss_scale) ts.push_back(*step.loss_scale);
        for (auto& t : ts)
          if (t.defined() && t.is_cuda()) t.record_stream(s);
      }
#endif
      Comm comm(core, step.label);
      const double h0 = Engine::now_s();
#ifdef LORECOMM_WITH_CUDA
      std::shared_ptr<std::pair<at::cuda::CUDAEvent, at::cuda::CUDAEvent>> timing;
      if (step.buffer.is_cuda()) {
        timing = std::make_shared<std::pair<at::cuda::CUDAEvent, at::cuda::CUDAEvent>>(
            at::cuda::CUDAEvent(cudaEventDefault), at::cuda::CUDAEvent(cudaEventDefault));
        timing->first.record(c10::cuda::getCurrentCUDAStream(step.buffer.device().index()));
      }
#endif
      try {
        // AMP: compress the unscaled gradient (error buffers must not mix loss scales)
        if (step.loss_scale) step.buffer.div_(*step.loss_scale);
        step.run(comm);
        if (step.loss_scale) step.buffer.mul_(*step.loss_scale);
      } catch (const StageError&) {
        throw;
      } catch (const std::exception& e) {
        throw StageError("lorecomm engine: " + step.label + " (" + step.kind() + "): " + message_of(e));
      }
      step.bytes_sent = comm.bytes();
      step.collectives = comm.collectives();
      step.host_seconds = Engine::now_s() - h0;
#ifdef LORECOMM_WITH_CUDA
      if (timing) {
        timing->second.record(c10::cuda::getCurrentCUDAStream(step.buffer.device().index()));
        step.device_timing = timing;
      }
#endif
    } catch (const std::exception& e) {
      const std::string msg = message_of(e);
      {
        std::lock_guard<std::mutex> g(core.mu);
        core.failure = msg;
      }
      err = std::make_exception_ptr(std::runtime_error(msg));
    } catch (...) {
      const std::string msg = "lorecomm engine: " + step.label + ": unknown error";
      {
        std::lock_guard<std::mutex> g(core.mu);
        core.failure = msg;
      }
      err = std::make_exception_ptr(std::runtime_error(msg));
    }
  }
  const double t1 = Engine::now_s();
  {
    std::lock_guard<std::mutex> g(core.mu);
    core.running = false;
    ++core.done;
    core.busy_s += t1 - t0;
    if (core.timeline.size() < 100000) core.timeline.push_back({it.seq, it.submit_s, t0, t1, err != nullptr});
  }
  // completes on the current stream (the engine's on GPU, sguard): consumers are ordered after it
  complete(core, it, err);
}

void worker_loop(std::shared_ptr<Core> core) {
  for (;;) {
    Item it;
    {
      std::unique_lock<std::mutex> g(core->mu);
      core->cv.wait(g, [&] { return core->stop || !core->queue.empty(); });
      if (core->stop) break;  // shutdown() fails what is left
      it = std::move(core->queue.front());
      core->queue.pop_front();
    }
    run_item(*core, it);
    it = Item();  // drop tensors before signalling idle: a drained engine holds no bucket
    core->idle_cv.notify_all();
    if (core->abandoned.load()) break;
  }
  std::lock_guard<std::mutex> g(core->mu);
  core->exited = true;
  core->exited_cv.notify_all();
  core->idle_cv.notify_all();
}

}  // namespace

// ------------------------------------------------------------------ Engine
Engine::Engine(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::chrono::milliseconds timeout, bool inline_mode)
    : core_(std::make_shared<Core>()) {
  TORCH_CHECK(pg, "lorecomm engine: a process group is required");
  core_->world_size = pg->getSize();
  try {
    core_->backend = pg->getDefaultBackend()->getBackendName();
  } catch (const std::exception&) {
    try {
      core_->backend = pg->getBackendName();
    } catch (const std::exception&) {
      core_->backend = "unnamed backend";
    }
  }
  core_->pg = std::move(pg);
  core_->timeout = timeout;
  core_->inline_mode = inline_mode;
  if (!inline_mode) {
    worker_ = std::thread(worker_loop, core_);
    core_->worker_id = worker_.get_id();
  } else {
    core_->exited = true;  // there is no worker
  }
}

Engine::~Engine() { shutdown(); }

bool Engine::shutdown(std::chrono::milliseconds grace) {
  std::lock_guard<std::mutex> once(shutdown_mu_);
  if (shut_) return clean_;
  shut_ = true;
  {
    std::lock_guard<std::mutex> g(core_->mu);
    core_->stop = true;
  }
  core_->cv.notify_all();
  bool joined = true;
  if (worker_.joinable()) {
    if (std::this_thread::get_id() == worker_.get_id()) {
      worker_.detach();  // from a callback on the worker: it leaves its loop after this step
      joined = false;
    } else {
      bool exited;
      {
        std::unique_lock<std::mutex> g(core_->mu);
        exited = core_->exited_cv.wait_for(g, grace, [&] { return core_->exited; });
      }
      if (exited) {
        worker_.join();
      } else {
        core_->abandoned = true;  // stuck in a collective: leave it, it keeps the core alive
        worker_.detach();
        joined = false;
      }
    }
  }
  std::deque<Item> orphans;
  {
    std::lock_guard<std::mutex> g(core_->mu);
    orphans.swap(core_->queue);
    if (joined || core_->inline_mode) core_->pg.reset();  // no step can run any more
  }
  for (auto& it : orphans)
    it.fut->setErrorIfNeeded(std::make_exception_ptr(
        std::runtime_error("lorecomm engine: shut down before " + it.step->label + " ran")));
  core_->idle_cv.notify_all();
  clean_ = !core_->abandoned.load();
  return clean_;
}

c10::intrusive_ptr<c10::ivalue::Future> Engine::submit(std::shared_ptr<Step> step) {
  TORCH_CHECK(step, "lorecomm engine: submit needs a step");
  std::vector<c10::Device> devices;
  if (step->buffer.defined() && step->buffer.is_cuda()) devices.push_back(step->buffer.device());
  auto fut = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get(), devices);
  Item it;
  it.step = std::move(step);
  it.fut = fut;
  it.submit_s = now_s();
  // OpenMP/MKL thread counts are per thread: a fresh worker would use every
  // core (oversubscribing with the backward pass); use the submitter's setting
  it.intra_threads = at::get_num_threads();
#ifdef LORECOMM_WITH_CUDA
  if (!core_->inline_mode && it.step->buffer.defined() && it.step->buffer.is_cuda()) {
    // the bucket is ready on the submitter's current stream: order after it
    auto ev = std::make_shared<at::cuda::CUDAEvent>();
    ev->record(c10::cuda::getCurrentCUDAStream(it.step->buffer.device().index()));
    it.ready_event = ev;
  }
#endif
  {
    std::lock_guard<std::mutex> g(core_->mu);
    if (core_->stop) {
      fut->setError(std::make_exception_ptr(std::runtime_error(
          "lorecomm engine: submit after shutdown (" + it.step->label + ")")));
      return fut;
    }
    it.seq = core_->next_seq++;
    if (it.step->label.empty()) it.step->label = "bucket #" + std::to_string(it.seq);
    if (!core_->inline_mode) {
      core_->queue.push_back(std::move(it));
      core_->cv.notify_one();
      return fut;
    }
  }
  run_item(*core_, it);
  return fut;
}

void Engine::drain() {
  {
    std::unique_lock<std::mutex> g(core_->mu);
    core_->idle_cv.wait(g, [&] { return (core_->queue.empty() && !core_->running) || core_->exited; });
  }
#ifdef LORECOMM_WITH_CUDA
  std::shared_ptr<void> stream;
  int dev;
  {
    std::lock_guard<std::mutex> g(core_->mu);
    stream = core_->stream;
    dev = core_->stream_device;
  }
  if (stream) {
    // the caller's stream must not run ahead of what the engine enqueued
    at::cuda::CUDAEvent ev;
    ev.record(*std::static_pointer_cast<c10::cuda::CUDAStream>(stream));
    ev.block(c10::cuda::getCurrentCUDAStream(dev));
  }
#endif
}

void Engine::reset() {
  std::lock_guard<std::mutex> g(core_->mu);
  core_->failure.reset();
}

bool Engine::inline_mode() const { return core_->inline_mode; }
bool Engine::stopped() const {
  std::lock_guard<std::mutex> g(core_->mu);
  return core_->stop;
}
int Engine::world_size() const { return core_->world_size; }
std::string Engine::backend() const { return core_->backend; }
int64_t Engine::steps_done() const {
  std::lock_guard<std::mutex> g(core_->mu);
  return core_->done;
}
int64_t Engine::pending() const {
  std::lock_guard<std::mutex> g(core_->mu);
  return static_cast<int64_t>(core_->queue.size()) + (core_->running ? 1 : 0);
}
double Engine::busy_seconds() const {
  std::lock_guard<std::mutex> g(core_->mu);
  return core_->busy_s;
}
std::optional<std::string> Engine::failure() const {
  std::lock_guard<std::mutex> g(core_->mu);
  return core_->failure;
}
std::vector<TimelineEntry> Engine::timeline(bool clear) {
  std::lock_guard<std::mutex> g(core_->mu);
  auto out = core_->timeline;
  if (clear) core_->timeline.clear();
  return out;
}
void Engine::set_logging(bool on) {
  std::lock_guard<std::mutex> g(core_->mu);
  core_->logging = on;
}
std::vector<CollectiveRecord> Engine::collective_log(bool clear) {
  std::lock_guard<std::mutex> g(core_->mu);
  auto out = core_->log;
  if (clear) core_->log.clear();
  return out;
}
bool Engine::on_worker_thread() const { return !core_->inline_mode && std::this_thread::get_id() == core_->worker_id; }

}  // namespace lorecomm::engine
