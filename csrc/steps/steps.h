// The compressor steps the engine runs (one class per compressor phase); the
// Python states (lorecomm/) build them per bucket, bindings in csrc/steps/bindings.cpp.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "../engine.h"
#include "common.h"

namespace lorecomm::steps {

// Plain averaging, optionally cast to a wire dtype (e.g. bf16) for the all-reduce. With `flush`
// batches the error buffers are sent too (G + E) and reset where the average is finite: a bucket
// a compressor hands back to dense loses nothing it still owed (`ok`: whether it was finite, so
// the flush happened; undefined without a flush). With `skip_unused` (DDP drops the output of a
// parameter no rank used) two flags per flushed matrix are all-reduced first (some rank used it,
// some rank's E is not zero), and a matrix no rank used keeps its E for a later flush (`owes`:
// some rank still owes after this step, or it was not finite; the same on every rank).
struct DenseStep : engine::Step {
  std::optional<at::ScalarType> wire;
  std::vector<Batch> flush;
  bool skip_unused = false;
  Tensor ok, owes;
  std::string kind() const override { return flush.empty() ? "dense" : "dense (error flush)"; }
  void check() const override;
  void run(engine::Comm& comm) override;
  void tensors(std::vector<at::Tensor>& out) const override;
};

// GreedyLore: refresh or compressed step (csrc/steps/greedylore.cpp).
struct GreedyLoreStep : engine::Step {
  bool refresh = false;
  std::vector<Batch> batches;    // G, E, U, ids, rank
  Ranges dense_ranges;           // compressed steps: the dense leftovers
  std::string selection = "greedy";
  int64_t sketch_k = 0;          // 0: the paper's probes; k > 0: k shared sketch probes
  bool error_feedback = true;
  int64_t seed = 0, step = 0;    // keys of the shared draws
  bool skip_unused = false;      // with error feedback: a matrix whose gradient is 0 on every rank sends 0, keeps E and U
  Tensor ok;                     // 0-dim bool on the device: the bucket was finite on every rank
  std::vector<int64_t> repairs;  // refresh: 1 per batch whose bases were broadcast from rank 0

  std::string kind() const override;
  void check() const override;
  void run(engine::Comm& comm) override;
  void tensors(std::vector<at::Tensor>& out) const override;

 private:
  void run_refresh(engine::Comm& comm);
  void run_compressed(engine::Comm& comm);
};

// Flynn et al.'s randomized linear compressors (csrc/steps/random_linear.cpp).
struct RandomLinearStep : engine::Step {
  std::string sketch = "haar";   // "randk" | "haar" | "gaussian"
  std::vector<Batch> batches;    // G, E (with error feedback), ids, rank
  Ranges dense_ranges;
  bool error_feedback = false;
  int64_t seed = 0, step = 0;
  bool skip_unused = false;      // with error feedback: a matrix whose gradient is 0 on every rank sends 0, keeps E
  Tensor ok;

  std::string kind() const override { return sketch + " compressed"; }
  void check() const override;
  void run(engine::Comm& comm) override;
  void tensors(std::vector<at::Tensor>& out) const override;
};

// Lore, the default compressor (csrc/steps/lore.cpp).
struct LoreStep : engine::Step {
  std::vector<Batch> batches;    // G, E, ids, rank, Q
  Ranges dense_ranges;
  at::ScalarType wire = at::kBFloat16;
  int64_t explore = 0;           // random directions per matrix this step: 0 or 1 (docs/LORE.md)
  int64_t seed = 0, step = 0;
  bool skip_unused = false;      // a matrix whose gradient is 0 on every rank sends 0, keeps E and Q
  Tensor ok;

  std::string kind() const override { return "lore compressed"; }
  void check() const override;
  void run(engine::Comm& comm) override;
  void tensors(std::vector<at::Tensor>& out) const override;
};

// Lore's last warm-up step: a dense all-reduce (as DenseStep), then Q of every
// batch from the averaged gradient (a randomized range finder), where it is finite.
struct LoreWarmupStep : engine::Step {
  std::vector<Batch> batches;    // G, ids, rank, Q
  int64_t seed = 0, step = 0;
  std::string kind() const override { return "lore warm-up"; }
  void check() const override;
  void run(engine::Comm& comm) override;
  void tensors(std::vector<at::Tensor>& out) const override;
};

// Checksums shared state (GreedyLore's bases, Lore's factors) across ranks and
// repairs any that differ by a broadcast from the group's rank 0.
struct ConsistencyStep : engine::Step {
  std::vector<Tensor> shared;    // contiguous float32 (B, x, y) tensors
  std::vector<int64_t> repairs;  // 1 per tensor that was broadcast
  std::string kind() const override;
  void check() const override;
  void run(engine::Comm& comm) override;
  void tensors(std::vector<at::Tensor>& out) const override;
};

// Every rank ends with bit-identical `shared` tensors; returns 1 per repaired tensor.
std::vector<int64_t> ensure_identical(engine::Comm& comm, const std::vector<Tensor>& shared);

}  // namespace lorecomm::steps
