// lorecomm's bucket pipeline engine (issue 4).
//
// The Python layer (lorecomm/engine.py) hands over one ready bucket plus its
// plan (batched oriented views of the compressed matrices, their error
// buffers, bases, probe keys and ranks, and the dense leftover ranges); the
// engine runs the bucket's phase asynchronously and completes a
// c10::ivalue::Future with the bucket tensor:
//   dense:       buffer /= N; all-reduce(buffer)
//   compressed:  scores (torch.ops.lorecomm.score_paper | score_sketch)
//                -> score all-reduce (mean) -> global finite flag and greedy
//                top-r selection on device (stable sort, ties to lower index)
//                -> project_residual into the factor buffer, dense leftovers
//                packed after the factors -> factor all-reduce (mean)
//                -> NaN poisoning of a non-finite step -> decompress into
//                the bucket, dense leftovers scattered back.
//                With given selections (the fixed / random ablations) the
//                scores and their all-reduce are replaced by a one-float
//                all-reduce of the finite flag.
//   refresh:     H = G + E in an fp32 copy of the bucket -> all-reduce (mean)
//                -> per batch a new basis (torch.ops.lorecomm.refresh_basis)
//                where finite, E = 0 -> MAX all-reduce of (checksum,
//                -checksum) per matrix -> broadcast of the bases from the
//                group's rank 0 where any rank differs -> bucket = mean H.
// Exactly the op calls and collective order of GreedyLoreState._compressed /
// _refresh (lorecomm/greedylore.py) so both paths agree bit for bit.
//
// Execution: one worker thread per engine runs jobs in submission order
// (collectives must be issued in the same order on every rank). On CPU the
// worker does the maths, so compressing bucket k overlaps the backward pass
// of bucket k+1. On GPU (LORECOMM_WITH_CUDA, not testable on the CPU CI) the
// worker only enqueues: it waits on an event recorded on the submitter's
// stream when the bucket was handed over, runs everything on the engine's own
// CUDA stream, and the Future records its completion on that stream; there is
// no host synchronisation (no .item(), no cudaStreamSynchronize) on dense and
// compressed buckets. A refresh (every update_interval steps) reads the
// checksum comparison on the worker thread to decide which bases to
// broadcast; that waits for the engine's stream, never the training stream.
//
// Errors (a collective that times out or whose peer died, a bad tensor, an op
// failure) are set on that job's Future with a message naming the bucket and
// the stage; the engine then fails every later job fast with the same cause
// (a broken collective sequence cannot be resumed safely) until reset().
#pragma once

#include <ATen/ATen.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace lorecomm::engine {

// Same-shape oriented matrices of one bucket (a plan's Batch).
struct BatchSpec {
  at::Tensor G;     // (B, a, b) strided view into the bucket (bucket dtype)
  at::Tensor E;     // (B, a, b) float32 error buffer (mutated)
  at::Tensor U;     // (B, a, a) float32 basis
  at::Tensor keys;  // (B,) int64 probe keys of this step (greedy compressed steps)
  int64_t rank = 0; // r, directions sent per matrix (compressed steps)
  at::Tensor picks; // (B, r) int64 given selection (fixed / random ablations); undefined: greedy
};

enum class Phase { Dense, Compressed, Refresh };

struct Job {
  Phase phase = Phase::Dense;
  at::Tensor buffer;  // the flat bucket (float32 / bfloat16 / float16)
  std::vector<BatchSpec> batches;
  std::vector<std::pair<int64_t, int64_t>> dense_ranges;  // [start, end) elements
  int64_t sketch_k = 0;        // 0: paper probes; k > 0: score_sketch with k probes
  bool error_feedback = true;
  std::optional<at::Tensor> ok_out;  // 0-dim bool: receives the bucket's global finite flag
  // refresh: (n_batches,) int64 on the CPU, set to 1 where the bases were broadcast from rank 0
  std::optional<at::Tensor> repairs_out;
  std::string label;                 // for error messages, e.g. "bucket 3"
};

struct TimelineEntry {
  int64_t seq;
  double submit_s, start_s, end_s;  // steady clock (== Python time.monotonic())
  bool failed;
};

class Engine {
 public:
  // timeout: upper bound on waiting for one collective (0: the process
  // group's own timeout alone, which Gloo and NCCL's blocking wait enforce).
  explicit Engine(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                  std::chrono::milliseconds timeout = std::chrono::milliseconds(0));
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queue one bucket; the returned Future completes with job.buffer.
  c10::intrusive_ptr<c10::ivalue::Future> submit(Job job);
  // Block until every queued job has finished (success or error).
  void drain();
  // Clear the failed state (after the caller rebuilt or re-synchronised the group).
  void reset();
  // Stop the worker and release the process group; pending jobs fail. Idempotent.
  void shutdown();

  int64_t jobs_done() const;
  int64_t pending() const;
  double busy_seconds() const;
  std::optional<std::string> failure() const;
  std::vector<TimelineEntry> timeline(bool clear);
  int world_size() const { return world_size_; }
  // True on the engine's worker thread (e.g. inside a Future callback): the
  // Engine must not be destroyed there; the Python binding defers it.
  bool on_worker_thread() const { return std::this_thread::get_id() == worker_.get_id(); }

  static double now_s();

 private:
  struct Item {
    Job job;
    c10::intrusive_ptr<c10::ivalue::Future> fut;
    at::ThreadLocalState tls;
    int64_t seq;
    double submit_s;
    int intra_threads = 0;  // the submitter's at::get_num_threads(), applied on the worker
#ifdef LORECOMM_WITH_CUDA
    std::shared_ptr<void> ready_event;  // at::cuda::CUDAEvent, type-erased
#endif
  };
  void loop();
  void run(Item& it);
  void run_dense(Job& job);
  void run_compressed(Job& job);
  void run_refresh(Job& job);
  void all_reduce_mean(const at::Tensor& t, const char* what, const Job& job);
  void all_reduce(const at::Tensor& t, c10d::ReduceOp op, const char* what, const Job& job);
  void broadcast(const at::Tensor& t, const char* what, const Job& job);
  void wait(const std::function<c10::intrusive_ptr<c10d::Work>()>& launch, const std::string& what,
            const Job& job);

  // released by shutdown(): a stopped engine must not keep the group (and its
  // backend threads) alive past destroy_process_group into interpreter exit
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  int world_size_;
  std::chrono::milliseconds timeout_;
  mutable std::mutex mu_;
  std::condition_variable cv_;       // work available / stop
  std::condition_variable idle_cv_;  // queue drained
  std::deque<Item> queue_;
  bool running_job_ = false;
  bool stop_ = false;
  int64_t next_seq_ = 0;
  int64_t done_ = 0;
  double busy_s_ = 0;
  std::optional<std::string> failure_;
  std::vector<TimelineEntry> timeline_;
  std::thread worker_;
#ifdef LORECOMM_WITH_CUDA
  std::shared_ptr<void> stream_;  // c10::cuda::CUDAStream per device, created lazily
  int stream_device_ = -1;
#endif
};

}  // namespace lorecomm::engine
