// lorecomm's bucket engine: the one runtime every compressor step runs on.
//
// The Python layer (lorecomm/state.py and the states) plans a bucket and
// builds one Step for it (csrc/steps/*.cpp: dense, GreedyLore, the randomized
// linear compressors, Lore); the engine runs the step and completes a
// c10::ivalue::Future with the bucket:
//   - worker mode (default): one worker thread per engine runs steps in
//     submission order, so compressing bucket k overlaps the backward pass of
//     bucket k+1 on CPU; on GPU (LORECOMM_WITH_CUDA) the worker only enqueues
//     work on the engine's own CUDA stream, ordered after the submitter's
//     stream by an event, and the Future completes on that stream;
//   - inline mode (LORECOMM_ENGINE=0): the same code on the caller's thread.
// Collectives go through the engine's own c10d process group (lorecomm/engine.py
// creates one per set of ranks, never shared with DDP or anyone else), issued by
// one thread in one order, and every one is counted (bytes, collectives) on
// the step that issued it, so Python reads what was sent instead of predicting it.
//
// Errors (a collective that times out or whose peer died, mismatched
// collectives, a bad tensor, an op failure) fail that step's Future with a
// message naming the bucket, the collective and the likely cause; the engine
// then fails every later step fast (a broken collective sequence cannot be
// resumed safely) until reset().
//
// Lifetime: the worker shares the engine's core through a shared_ptr, so a
// shutdown() that gives up waiting on a worker stuck in a collective can
// abandon it (detach) without a use-after-free; an abandoned worker never
// completes a Future again (no Python callback after interpreter exit).
#pragma once

#include <ATen/ATen.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace lorecomm::engine {

// One collective as the worker issued it (the engine's optional log).
struct CollectiveRecord {
  std::string op;    // "all_reduce_sum", "all_reduce_max", "broadcast"
  int64_t numel;
  at::ScalarType dtype;
  std::string what;  // e.g. "factor"
};

struct TimelineEntry {
  int64_t seq;
  double submit_s, start_s, end_s;  // steady clock (== Python time.monotonic())
  bool failed;
};

struct Core;

// The collectives of one step, on the engine's group; counts what it issues.
class Comm {
 public:
  Comm(Core& core, const std::string& label) : core_(core), label_(label) {}
  int world_size() const;
  // t /= N, then sum all-reduce (DDP's convention: bit-identical to its own hook)
  void all_reduce_mean(const at::Tensor& t, const char* what);
  void all_reduce_sum(const at::Tensor& t, const char* what);  // the caller already divided
  void all_reduce_max(const at::Tensor& t, const char* what);
  void broadcast(const at::Tensor& t, const char* what);  // from the group's rank 0
  int64_t bytes() const { return bytes_; }
  int64_t collectives() const { return collectives_; }

 private:
  void issue(const char* op, const at::Tensor& t, const char* what);
  Core& core_;
  const std::string& label_;
  int64_t bytes_ = 0, collectives_ = 0;
};

// One bucket's work in one phase of one compressor (csrc/steps/). The engine
// validates it (check), runs it (run) and records what it sent.
class Step {
 public:
  virtual ~Step() = default;
  virtual std::string kind() const = 0;  // e.g. "greedylore refresh", for messages
  virtual void check() const {}          // throws on bad input, before any collective
  virtual void run(Comm& comm) = 0;
  // every tensor the step reads or writes: kept alive for the engine's CUDA stream
  virtual void tensors(std::vector<at::Tensor>& out) const { out.push_back(buffer); }

  at::Tensor buffer;                 // the flat bucket; the Future completes with it
  std::string label;                 // "bucket 3 (step 12, 324 elements)"
  std::optional<at::Tensor> loss_scale;  // 0-dim float: the bucket holds scale * gradient (AMP)
  // filled by the engine when the step ran (read after the Future completed)
  int64_t bytes_sent = 0;
  int64_t collectives = 0;
  double host_seconds = 0;  // wall time of the step on the host (CPU: its whole cost; CUDA: enqueueing)
  // The step's cost: host_seconds on CPU; on CUDA the time between two events recorded around it on
  // the engine's stream (waits for the second one: call it off the hot path).
  double elapsed_seconds() const;
  std::shared_ptr<void> device_timing;  // CUDA: std::pair of timing CUDAEvents
};

class Engine {
 public:
  // timeout: upper bound on one collective (0: the process group's own).
  // inline_mode: run every step on the submitting thread (no worker).
  explicit Engine(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                  std::chrono::milliseconds timeout = std::chrono::milliseconds(0), bool inline_mode = false);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queue one step (or, inline, run it); the Future completes with step->buffer.
  c10::intrusive_ptr<c10::ivalue::Future> submit(std::shared_ptr<Step> step);
  // Block until every queued step has finished; on GPU the caller's current
  // stream then also waits for the engine's stream.
  void drain();
  // Clear the failed state (after every rank has recovered the same way).
  void reset();
  // Stop the worker (pending steps fail) and release the process group.
  // Waits up to `grace` for a step that is running; a worker still stuck in a
  // collective after that is abandoned. Idempotent, thread-safe. Returns
  // false if the worker had to be abandoned.
  bool shutdown(std::chrono::milliseconds grace = std::chrono::milliseconds(10000));

  bool inline_mode() const;
  bool stopped() const;
  int world_size() const;
  std::string backend() const;
  int64_t steps_done() const;
  int64_t pending() const;
  double busy_seconds() const;
  std::optional<std::string> failure() const;
  std::vector<TimelineEntry> timeline(bool clear);
  void set_logging(bool on);
  std::vector<CollectiveRecord> collective_log(bool clear);
  // True on the engine's worker thread (e.g. inside a Future callback).
  bool on_worker_thread() const;

  static double now_s();

 private:
  std::shared_ptr<Core> core_;
  std::thread worker_;
  std::mutex shutdown_mu_;
  bool shut_ = false, clean_ = true;  // guarded by shutdown_mu_
};

}  // namespace lorecomm::engine
