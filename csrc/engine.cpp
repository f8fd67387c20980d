// lorecomm bucket pipeline engine: see engine.h.
#include "engine.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef LORECOMM_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cmath>
#include <exception>
#include <sstream>
#include <stdexcept>

namespace lorecomm::engine {
namespace {

// torch.ops.lorecomm.<name>, called boxed: works with any registered kernel
// (the C++ CPU kernels of csrc/ops.cpp, Triton kernels registered from
// Python, or a Python reference), whatever its exact C++ signature.
c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor call1(const char* name, std::vector<c10::IValue> args) {
  torch::jit::Stack stack(std::move(args));
  op(name).callBoxed(stack);
  TORCH_CHECK(stack.size() == 1 && stack[0].isTensor(), name, " did not return one tensor");
  return std::move(stack[0]).toTensor();
}

void call0(const char* name, std::vector<c10::IValue> args) {
  torch::jit::Stack stack(std::move(args));
  op(name).callBoxed(stack);
}

struct StageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// the message without the C++ backtrace c10::Error appends
const char* message_of(const std::exception& e) {
  if (const auto* ce = dynamic_cast<const c10::Error*>(&e)) return ce->what_without_backtrace();
  return e.what();
}

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  if (!t.defined()) return "undefined";
  s << t.scalar_type() << t.sizes() << " on " << t.device();
  return s.str();
}

void check_job(const Job& job) {
  const auto& buf = job.buffer;
  TORCH_CHECK(buf.defined() && buf.dim() == 1 && buf.is_contiguous(),
              "the bucket must be a contiguous 1-D tensor, got ", describe(buf));
  auto dt = buf.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "the bucket dtype must be float32, bfloat16 or float16, got ", dt);
  for (size_t i = 0; i < job.batches.size(); ++i) {
    const auto& b = job.batches[i];
    TORCH_CHECK(b.G.defined() && b.G.dim() == 3, "batch ", i, ": G must be (B, a, b), got ", describe(b.G));
    const auto B = b.G.size(0), a = b.G.size(1), n = b.G.size(2);
    TORCH_CHECK(b.E.defined() && b.E.sizes() == b.G.sizes() && b.E.scalar_type() == at::kFloat,
                "batch ", i, ": E must be float32 ", b.G.sizes(), ", got ", describe(b.E));
    TORCH_CHECK(b.U.defined() && b.U.dim() == 3 && b.U.size(0) == B && b.U.size(1) == a && b.U.size(2) == a &&
                    b.U.scalar_type() == at::kFloat,
                "batch ", i, ": U must be float32 (", B, ", ", a, ", ", a, "), got ", describe(b.U));
    std::vector<const at::Tensor*> on_device{&b.G, &b.E, &b.U};
    if (job.phase == Phase::Compressed) {
      TORCH_CHECK(b.rank >= 1 && b.rank <= a, "batch ", i, ": rank ", b.rank, " must be in [1, ", a, "]");
      TORCH_CHECK(b.picks.defined() == job.batches[0].picks.defined(),
                  "batch ", i, ": either every batch has given picks or none");
      if (b.picks.defined()) {
        TORCH_CHECK(b.picks.dim() == 2 && b.picks.size(0) == B && b.picks.size(1) == b.rank &&
                        b.picks.scalar_type() == at::kLong,
                    "batch ", i, ": picks must be int64 (", B, ", ", b.rank, "), got ", describe(b.picks));
        on_device.push_back(&b.picks);
      } else {
        TORCH_CHECK(b.keys.defined() && b.keys.dim() == 1 && b.keys.size(0) == B &&
                        b.keys.scalar_type() == at::kLong,
                    "batch ", i, ": keys must be int64 (", B, ",), got ", describe(b.keys));
        on_device.push_back(&b.keys);
      }
    }
    for (const auto* t : on_device)
      TORCH_CHECK(t->device() == buf.device(), "batch ", i, ": all tensors must be on the bucket's device ",
                  buf.device(), ", got ", describe(*t));
    (void)n;
  }
  const auto nb = static_cast<int64_t>(job.batches.size());
  TORCH_CHECK(!job.ok_out || (job.ok_out->dim() == 0 && job.ok_out->scalar_type() == at::kBool),
              "ok_out must be a 0-dim bool tensor, got ", describe(*job.ok_out));
  if (job.phase == Phase::Refresh) {
    TORCH_CHECK(!job.repairs_out || (job.repairs_out->dim() == 1 && job.repairs_out->size(0) == nb &&
                                     job.repairs_out->scalar_type() == at::kLong && job.repairs_out->is_cpu()),
                "refresh: repairs_out must be int64 (", nb, ",) on the CPU, got ", describe(*job.repairs_out));
  }
  for (const auto& [s, e] : job.dense_ranges)
    TORCH_CHECK(0 <= s && s <= e && e <= buf.numel(), "dense range [", s, ", ", e, ") outside the bucket of ",
                buf.numel(), " elements");
}

}  // namespace

double Engine::now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Engine::Engine(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::chrono::milliseconds timeout)
    : pg_(std::move(pg)), world_size_(0), timeout_(timeout) {
  TORCH_CHECK(pg_, "lorecomm engine: a process group is required");
  world_size_ = pg_->getSize();
  worker_ = std::thread([this] { loop(); });
}

Engine::~Engine() { shutdown(); }

void Engine::shutdown() {
  std::deque<Item> orphans;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_ && !worker_.joinable()) return;
    stop_ = true;
  }
  cv_.notify_all();
  bool joined = false;
  if (worker_.joinable()) {
    if (worker_.get_id() != std::this_thread::get_id()) {
      worker_.join();
      joined = true;
    } else {
      worker_.detach();  // called from a callback on the worker: it exits after this job
    }
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    orphans.swap(queue_);
    if (joined) pg_.reset();  // no job can run any more
  }
  for (auto& it : orphans)
    it.fut->setErrorIfNeeded(std::make_exception_ptr(
        std::runtime_error("lorecomm engine: shut down before " + it.job.label + " ran")));
  idle_cv_.notify_all();
}

c10::intrusive_ptr<c10::ivalue::Future> Engine::submit(Job job) {
  std::vector<c10::Device> devices;
  if (job.buffer.defined() && job.buffer.is_cuda()) devices.push_back(job.buffer.device());
  auto fut = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get(), devices);
  Item it{std::move(job), fut, at::ThreadLocalState(), 0, now_s()};
  // OpenMP/MKL thread counts are per thread: a fresh worker would use every
  // core (oversubscribing with the backward pass); use the submitter's setting
  it.intra_threads = at::get_num_threads();
#ifdef LORECOMM_WITH_CUDA
  if (it.job.buffer.defined() && it.job.buffer.is_cuda()) {
    // the bucket is ready on the submitter's current stream: order after it
    auto ev = std::make_shared<at::cuda::CUDAEvent>();
    ev->record(c10::cuda::getCurrentCUDAStream(it.job.buffer.device().index()));
    it.ready_event = ev;
  }
#endif
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) {
      fut->setError(std::make_exception_ptr(std::runtime_error("lorecomm engine: submit after shutdown")));
      return fut;
    }
    it.seq = next_seq_++;
    if (it.job.label.empty()) it.job.label = "bucket #" + std::to_string(it.seq);
    queue_.push_back(std::move(it));
  }
  cv_.notify_one();
  return fut;
}

void Engine::drain() {
  std::unique_lock<std::mutex> g(mu_);
  idle_cv_.wait(g, [this] { return (queue_.empty() && !running_job_) || (stop_ && !worker_.joinable()); });
}

void Engine::reset() {
  std::lock_guard<std::mutex> g(mu_);
  failure_.reset();
}

int64_t Engine::jobs_done() const {
  std::lock_guard<std::mutex> g(mu_);
  return done_;
}
int64_t Engine::pending() const {
  std::lock_guard<std::mutex> g(mu_);
  return static_cast<int64_t>(queue_.size()) + (running_job_ ? 1 : 0);
}
double Engine::busy_seconds() const {
  std::lock_guard<std::mutex> g(mu_);
  return busy_s_;
}
std::optional<std::string> Engine::failure() const {
  std::lock_guard<std::mutex> g(mu_);
  return failure_;
}
std::vector<TimelineEntry> Engine::timeline(bool clear) {
  std::lock_guard<std::mutex> g(mu_);
  auto out = timeline_;
  if (clear) timeline_.clear();
  return out;
}

void Engine::loop() {
  for (;;) {
    Item it;
    {
      std::unique_lock<std::mutex> g(mu_);
      cv_.wait(g, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;  // shutdown() fails what is left
      it = std::move(queue_.front());
      queue_.pop_front();
      running_job_ = true;
    }
    const double t0 = now_s();
    bool failed = false;
    std::optional<std::string> prior;
    {
      std::lock_guard<std::mutex> g(mu_);
      prior = failure_;
    }
    if (prior) {
      failed = true;
      it.fut->setError(std::make_exception_ptr(std::runtime_error(
          "lorecomm engine: " + it.job.label + " not run: an earlier bucket failed (" + *prior +
          "); the collective sequence of this process group is broken")));
    } else {
      try {
        at::ThreadLocalStateGuard tls_guard(it.tls);
        run(it);
      } catch (const std::exception& e) {
        failed = true;
        std::string msg = message_of(e);
        {
          std::lock_guard<std::mutex> g(mu_);
          failure_ = msg;
        }
        it.fut->setErrorIfNeeded(std::make_exception_ptr(std::runtime_error(msg)));
      } catch (...) {
        failed = true;
        std::string msg = "lorecomm engine: " + it.job.label + ": unknown error";
        {
          std::lock_guard<std::mutex> g(mu_);
          failure_ = msg;
        }
        it.fut->setErrorIfNeeded(std::make_exception_ptr(std::runtime_error(msg)));
      }
    }
    const double t1 = now_s();
    {
      std::lock_guard<std::mutex> g(mu_);
      running_job_ = false;
      ++done_;
      busy_s_ += t1 - t0;
      if (timeline_.size() < 100000) timeline_.push_back({it.seq, it.submit_s, t0, t1, failed});
    }
    // drop tensors before signalling idle, so a drained engine holds no bucket
    it = Item();
    idle_cv_.notify_all();
  }
}

void Engine::run(Item& it) {
  Job& job = it.job;
  if (it.intra_threads > 0 && at::get_num_threads() != it.intra_threads) at::set_num_threads(it.intra_threads);
  const char* phase = job.phase == Phase::Dense ? "dense" : job.phase == Phase::Refresh ? "refresh" : "compressed";
  try {
    check_job(job);
  } catch (const std::exception& e) {
    throw StageError(std::string("lorecomm engine: ") + job.label + " (" + phase + "): bad input: " + message_of(e));
  }
#ifdef LORECOMM_WITH_CUDA
  std::optional<c10::cuda::CUDAStreamGuard> sguard;
  if (job.buffer.is_cuda()) {
    const int dev = job.buffer.device().index();
    if (!stream_ || stream_device_ != dev) {
      stream_ = std::make_shared<c10::cuda::CUDAStream>(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, dev));
      stream_device_ = dev;
    }
    auto& s = *std::static_pointer_cast<c10::cuda::CUDAStream>(stream_);
    std::static_pointer_cast<at::cuda::CUDAEvent>(it.ready_event)->block(s);  // GPU-side wait, host goes on
    sguard.emplace(s);
    // the bucket and state are used on our stream: keep the allocator from recycling them early
    job.buffer.record_stream(s);
  }
#endif
  try {
    if (job.phase == Phase::Dense || job.batches.empty()) {
      run_dense(job);
    } else if (job.phase == Phase::Refresh) {
      run_refresh(job);
    } else {
      run_compressed(job);
    }
  } catch (const StageError&) {
    throw;
  } catch (const std::exception& e) {
    throw StageError(std::string("lorecomm engine: ") + job.label + " (" + phase + "): " + message_of(e));
  }
  // completes on the current stream (the engine's on GPU): consumers are ordered after it
  it.fut->markCompleted(c10::IValue(job.buffer));
}

void Engine::wait(const std::function<c10::intrusive_ptr<c10d::Work>()>& launch, const std::string& what,
                  const Job& job) {
  try {
    auto work = launch();
    if (!work->wait(timeout_)) throw std::runtime_error("collective did not complete");
  } catch (const std::exception& e) {
    std::ostringstream s;
    s << "lorecomm engine: " << job.label << ": " << what << " over " << world_size_ << " ranks ("
      << pg_->getBackendName() << ") failed: " << message_of(e)
      << (timeout_.count() > 0 ? " [engine timeout " + std::to_string(timeout_.count()) + " ms]" : "")
      << ". A rank died, timed out or issued different collectives; the step cannot complete.";
    throw StageError(s.str());
  }
}

static std::string collective_name(const char* what, const char* kind, const at::Tensor& t) {
  std::ostringstream s;
  s << what << " " << kind << " of " << t.numel() << " " << t.scalar_type() << " elements";
  return s.str();
}

void Engine::all_reduce(const at::Tensor& t, c10d::ReduceOp op, const char* what, const Job& job) {
  std::vector<at::Tensor> v{t};
  c10d::AllreduceOptions opts;
  opts.reduceOp = op;
  wait([&] { return pg_->allreduce(v, opts); }, collective_name(what, "all-reduce", t), job);
}

void Engine::all_reduce_mean(const at::Tensor& t, const char* what, const Job& job) {
  // DDP's convention, as CommState._all_reduce_mean: divide, then sum-all-reduce
  t.div_(world_size_);
  all_reduce(t, c10d::ReduceOp::SUM, what, job);
}

void Engine::broadcast(const at::Tensor& t, const char* what, const Job& job) {
  std::vector<at::Tensor> v{t};
  c10d::BroadcastOptions opts;
  opts.rootRank = 0;  // the group's rank 0, as GreedyLoreState._ensure_identical_bases
  wait([&] { return pg_->broadcast(v, opts); }, collective_name(what, "broadcast", t), job);
}

void Engine::run_dense(Job& job) { all_reduce_mean(job.buffer, "dense", job); }

void Engine::run_compressed(Job& job) {
  const auto& buf = job.buffer;
  const auto fopts = buf.options().dtype(at::kFloat);
  // the factor (+ dense) buffer; dense leftovers go in first: their finite flag joins the selection's
  int64_t factors = 0, dense_numel = 0;
  for (const auto& b : job.batches) factors += b.G.size(0) * b.rank * b.G.size(2);
  for (const auto& [s, e] : job.dense_ranges) dense_numel += e - s;
  at::Tensor comm = at::empty({factors + dense_numel}, fopts);
  at::Tensor dense = comm.narrow(0, factors, dense_numel);
  int64_t pos = 0;
  for (const auto& [s, e] : job.dense_ranges) {
    dense.narrow(0, pos, e - s).copy_(buf.narrow(0, s, e - s));
    pos += e - s;
  }
  const at::Tensor zero = at::scalar_tensor(0.0, fopts), nan = at::scalar_tensor(std::nan(""), fopts);
  std::vector<at::Tensor> picks;
  at::Tensor ok;
  if (job.batches[0].picks.defined()) {
    // 1-3 with given selections (fixed / random): only the global finite flag travels
    at::Tensor bad = at::zeros({1}, fopts);
    bad.add_(at::isfinite(buf).logical_not().any());
    all_reduce_mean(bad, "finite-flag", job);
    ok = bad.select(0, 0).eq(0);
    for (const auto& b : job.batches) picks.push_back(b.picks);
  } else {
    // 1. scores of every batch (H = G + E never materialised), flattened back to back
    std::vector<at::Tensor> scores;
    scores.reserve(job.batches.size());
    for (auto& b : job.batches) {
      at::Tensor lam = job.sketch_k > 0
                           ? call1("lorecomm::score_sketch", {b.G, b.E, b.U, b.keys, job.sketch_k})
                           : call1("lorecomm::score_paper", {b.G, b.E, b.U, b.keys});
      scores.push_back(lam.reshape({-1}));
    }
    at::Tensor flat = at::cat(scores);
    // a non-finite dense leftover must skip the step too: its NaN rides in the
    // first score (x + 0.0 leaves every score as it was otherwise)
    if (dense_numel > 0) flat.narrow(0, 0, 1).add_(at::where(at::isfinite(dense).all(), zero, nan));
    // 2. averaged signed scores
    all_reduce_mean(flat, "score", job);
    // 3. global finite flag and greedy selection, on device
    ok = at::isfinite(flat).all();
    pos = 0;
    for (size_t i = 0; i < scores.size(); ++i) {
      const auto& b = job.batches[i];
      const int64_t B = b.G.size(0), a = b.G.size(1);
      const int64_t n = scores[i].numel();
      at::Tensor lbar = flat.narrow(0, pos, n).view({B, a, -1});
      pos += n;
      at::Tensor energy = lbar.square().mean(-1);
      // stable descending sort: ties go to the lower index, on every rank alike
      at::Tensor idx = std::get<1>(energy.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
      picks.push_back(idx.narrow(-1, 0, b.rank));
    }
  }
  at::Tensor update_error = job.error_feedback ? ok : ok.logical_and(at::zeros_like(ok));
  // 4. project + residual into the factor buffer (the dense leftovers follow the factors)
  std::vector<std::pair<at::Tensor, at::Tensor>> PR;
  pos = 0;
  for (size_t i = 0; i < job.batches.size(); ++i) {
    auto& b = job.batches[i];
    const int64_t B = b.G.size(0), a = b.G.size(1), n = b.G.size(2), r = b.rank;
    at::Tensor P = b.U.gather(2, picks[i].unsqueeze(1).expand({B, a, r}));
    at::Tensor R = comm.narrow(0, pos, B * r * n).view({B, r, n});
    call0("lorecomm::project_residual", {b.G, b.E, P, R, update_error});
    PR.emplace_back(P, R);
    pos += B * r * n;
  }
  // 5. factor (+ dense) all-reduce
  all_reduce_mean(comm, "factor", job);
  // a skipped (non-finite) step must reach the optimizer as non-finite on every rank
  comm.narrow(0, 0, factors).add_(at::where(ok, zero, nan));
  // 6. decompress into the bucket, dense leftovers back
  for (size_t i = 0; i < job.batches.size(); ++i)
    call0("lorecomm::decompress", {PR[i].first, PR[i].second, job.batches[i].G});
  pos = factors;
  for (const auto& [s, e] : job.dense_ranges) {
    buf.narrow(0, s, e - s).copy_(comm.narrow(0, pos, e - s));
    pos += e - s;
  }
  if (job.ok_out) job.ok_out->copy_(ok);
}

// One int64 per matrix that changes with any bit of it (wrapping arithmetic),
// as lorecomm.greedylore.bitwise_checksum.
static at::Tensor bitwise_checksum(const at::Tensor& U) {
  at::Tensor bits = U.contiguous().view(at::kInt).reshape({U.size(0), -1}).to(at::kLong);
  at::Tensor weights = at::arange(1, bits.size(1) + 1, bits.options());
  return (bits * weights).sum(-1);
}

void Engine::run_refresh(Job& job) {
  const auto& buf = job.buffer;
  const int64_t nb = static_cast<int64_t>(job.batches.size());
  at::Tensor comm = buf.scalar_type() == at::kFloat ? buf : buf.to(at::kFloat);
  // the batch's strided view of G, taken in the fp32 copy
  auto view_in_comm = [&](const at::Tensor& G) {
    return comm.as_strided(G.sizes(), G.strides(), comm.storage_offset() + G.storage_offset() - buf.storage_offset());
  };
  // 1. dense all-reduce of the error-corrected gradient
  if (job.error_feedback)
    for (const auto& b : job.batches) view_in_comm(b.G).add_(b.E);
  all_reduce_mean(comm, "refresh", job);
  // 2. new bases where the whole mean bucket is finite, error buffers reset
  at::Tensor ok = at::isfinite(comm).all();
  for (const auto& b : job.batches) {
    b.U.copy_(at::where(ok, call1("lorecomm::refresh_basis", {view_in_comm(b.G)}), b.U));
    b.E.masked_fill_(ok, 0.0);
  }
  if (job.ok_out) job.ok_out->copy_(ok);
  // 3. bit-identical bases on every rank: compare checksums, repair from rank 0
  std::vector<at::Tensor> sums;
  for (const auto& b : job.batches) sums.push_back(bitwise_checksum(b.U));
  at::Tensor all = at::cat(sums);
  at::Tensor both = at::cat({all, all.neg()});
  all_reduce(both, c10d::ReduceOp::MAX, "basis checksum", job);
  const int64_t n = all.numel();
  // the one host read of the engine: which bases to broadcast (refresh steps only)
  at::Tensor differs = both.narrow(0, 0, n).ne(both.narrow(0, n, n).neg()).cpu();
  const bool* d = differs.data_ptr<bool>();
  int64_t pos = 0;
  for (int64_t i = 0; i < nb; ++i) {
    const auto& b = job.batches[i];
    const int64_t B = b.U.size(0);
    const bool repair = std::any_of(d + pos, d + pos + B, [](bool x) { return x; });
    if (repair) broadcast(b.U, "basis repair", job);
    if (job.repairs_out) job.repairs_out->select(0, i).fill_(repair ? 1 : 0);
    pos += B;
  }
  if (!comm.is_same(buf)) buf.copy_(comm);
}

}  // namespace lorecomm::engine
