// What the compressor steps (csrc/steps/*.cpp) share: the batch of same-shape
// matrices a plan hands over, op calls through the dispatcher, dense leftovers,
// shared random draws derived on device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <utility>
#include <vector>

#include "../engine.h"

namespace lorecomm::steps {

using at::Tensor;

// Same-shape oriented matrices of one bucket (a plan's Batch).
struct Batch {
  Tensor G;          // (B, a, b) strided view into the bucket (bucket dtype)
  Tensor E;          // (B, a, b) float32 error buffer; undefined: no error-feedback state
  Tensor ids;        // (B,) int64 stable parameter ids, on the bucket's device (keys the shared draws)
  int64_t rank = 0;  // r, directions sent per matrix
  Tensor U;          // GreedyLore: (B, a, a) float32 basis
  Tensor Q;          // Lore: (B, r, b) float32 right factor of the last step (warm start)

  int64_t B() const { return G.size(0); }
  int64_t a() const { return G.size(1); }
  int64_t b() const { return G.size(2); }
};

using Ranges = std::vector<std::pair<int64_t, int64_t>>;  // [start, end) element ranges of the bucket

// torch.ops.lorecomm.<name>, called boxed: works with any registered kernel
// (the C++ CPU kernels, the Triton kernels registered from Python, a test's).
Tensor call1(const char* name, std::vector<c10::IValue> args);
void call0(const char* name, std::vector<c10::IValue> args);

// Probe keys of a batch for (seed, step, stream): lorecomm.probes.probe_key per
// parameter id, computed on the ids' device (no host round trip).
Tensor keys_for(const Batch& b, int64_t seed, int64_t step, int64_t stream);

// Validation shared by the steps (throws with the batch index in the message).
void check_batches(const std::vector<Batch>& batches, const Tensor& buffer, bool need_E, bool need_ids);
void check_ranges(const Ranges& ranges, const Tensor& buffer);

int64_t numel_of(const Ranges& ranges);
// out[0 : numel] <- the ranges of buf, back to back (out may be another dtype)
void gather_ranges(const Tensor& buf, const Ranges& ranges, const Tensor& out);
void scatter_ranges(const Tensor& src, const Ranges& ranges, const Tensor& buf);

// 0 where ok, NaN otherwise (0-dim float32 on ok's device): a skipped step must
// reach the optimizer as non-finite on every rank, so AMP's scaler skips it too.
Tensor poison(const Tensor& ok);

// (B, m, n) -> (B,) bool: the matrix has an entry that is not zero (NaN counts): a used
// parameter's gradient, an error buffer that still owes something.
Tensor nonzero_matrices(const Tensor& X);

// skip_unused (DDP with find_unused_parameters / static_graph drops the output of a parameter
// no rank used): `used_flags` writes one 0/1 per matrix of the batches into out[0 : matrices],
// to ride in a mean all-reduce; `unused_masks` reads them back reduced, per batch a (B, 1, 1)
// bool mask of the matrices no rank used (the same on every rank; on the device, no host sync).
// A step projects those on a zero basis: it sends 0 for them and keeps their E exactly.
int64_t matrices_of(const std::vector<Batch>& batches);
void used_flags(const std::vector<Batch>& batches, const Tensor& out);
std::vector<Tensor> unused_masks(const std::vector<Batch>& batches, const Tensor& reduced);

// r distinct sorted indices out of range(n) per matrix, from Philox draws keyed
// per matrix: lorecomm.sketches.random_indices (B, r) int64.
Tensor random_indices(const Tensor& keys, int64_t n, int64_t r);

// (B, a, c) -> (B, a, c) float32 orthonormal columns spanning the same nested
// ranges: Householder QR in Y's precision (float64 for float64 Y, else float32), signs
// fixed by R's diagonal (deterministic for identical inputs, so every rank derives the
// same bases from the same sums).
Tensor orthonormal_columns(const Tensor& Y);

inline std::vector<at::Tensor> batch_tensors(const std::vector<Batch>& batches) {
  std::vector<at::Tensor> out;
  for (const auto& b : batches)
    for (const auto* t : {&b.G, &b.E, &b.ids, &b.U, &b.Q})
      if (t->defined()) out.push_back(*t);
  return out;
}

}  // namespace lorecomm::steps
