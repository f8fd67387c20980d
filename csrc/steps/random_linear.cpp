// The randomized linear compressors of Flynn, Johnstone & Yoo (arXiv 2411.12898)
// on the engine: x <- Q^T Q g with a random Q every rank draws from the same
// keys (seed, step, parameter id), so only Q g travels.
//
// Per oriented a x b matrix, Q acts on the short side: r rows of Q per column
// (r * b numbers, GreedyLore's budget at rank r), except rand-k, which keeps
// k = r * b random coordinates of the whole matrix. Frames (a x r):
//   haar:     the Q factor of an a x r Gaussian (sign-fixed), orthonormal columns;
//   gaussian: i.i.d. N(0, 1/r) entries (unbiased) or N(0, 1/a) (with EF).
// Without error feedback the compressor is unbiased (haar and rand-k scaled by
// a/r); with error feedback it is left unscaled and E keeps H - Q^T Q H.
//
// Order: one-float finite-flag all-reduce, factors (+ dense leftovers)
// all-reduce, NaN poisoning of a non-finite step, decompress. With skip_unused
// (error feedback under DDP with find_unused_parameters / static_graph) one used
// flag per matrix rides after the finite flag: a matrix no rank used sends 0
// and keeps its E exactly, for when it is used again.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "common.h"
#include "steps.h"

namespace lorecomm::steps {
namespace {

constexpr int64_t kSketchStream = 2;

// The (B, a, r) float32 frame of each matrix (lorecomm.sketches.frame).
Tensor frame(const std::string& sketch, const Tensor& keys, int64_t a, int64_t r, bool unbiased) {
  Tensor g = call1("lorecomm::probe_normal", {keys, a, r});
  if (sketch == "gaussian") return g.div(std::sqrt(static_cast<double>(unbiased ? r : a)));
  return orthonormal_columns(g);  // QR's sign convention fixed: Haar distributed
}

}  // namespace

void RandomLinearStep::check() const {
  check_batches(batches, buffer, /*need_E=*/error_feedback, /*need_ids=*/true);
  check_ranges(dense_ranges, buffer);
  TORCH_CHECK(sketch == "randk" || sketch == "haar" || sketch == "gaussian",
              "sketch must be randk, haar or gaussian, got ", sketch);
  TORCH_CHECK(!batches.empty(), "a compressed step needs at least one compressed matrix");
}

void RandomLinearStep::tensors(std::vector<at::Tensor>& out) const {
  out.push_back(buffer);
  for (auto& t : batch_tensors(batches)) out.push_back(t);
  out.push_back(ok);
}

void RandomLinearStep::run(engine::Comm& comm) {
  const auto& buf = buffer;
  const auto fopts = buf.options().dtype(at::kFloat);
  const bool unbiased = !error_feedback;
  const bool deferred = error_feedback && buf.scalar_type() == at::kHalf;  // E after the fp16 output is checked
  // 1. the global finite flag (and, skip_unused, one used flag per matrix after it)
  const int64_t matrices = matrices_of(batches);
  Tensor bad = at::zeros({1 + (skip_unused ? matrices : 0)}, fopts);
  bad.narrow(0, 0, 1).add_(at::isfinite(buf).logical_not().any());
  if (skip_unused) used_flags(batches, bad.narrow(0, 1, matrices));
  comm.all_reduce_mean(bad, "finite-flag");
  const Tensor ok_now = bad.select(0, 0).eq(0);
  const std::vector<Tensor> unused =
      skip_unused ? unused_masks(batches, bad.narrow(0, 1, matrices)) : std::vector<Tensor>(batches.size());
  const Tensor update_now = error_feedback && !deferred ? ok_now : at::zeros_like(ok_now);
  int64_t factors = 0;
  for (const auto& b : batches) factors += b.B() * b.rank * b.b();
  const int64_t dense_numel = numel_of(dense_ranges);
  Tensor wire = at::empty({factors + dense_numel}, fopts);
  // 2. compress every batch into the wire buffer
  std::vector<Tensor> draws;  // per batch: the coordinates (randk) or the frame
  std::vector<double> scales;
  int64_t pos = 0;
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    const int64_t B = b.B(), a = b.a(), n = b.b(), r = b.rank;
    Tensor keys = keys_for(b, seed, step, kSketchStream);
    Tensor R = wire.narrow(0, pos, B * r * n).view({B, r, n});
    pos += B * r * n;
    // a matrix no rank used (skip_unused) sends 0 and keeps E exactly (its output is dropped)
    if (sketch == "randk") {
      Tensor idx = random_indices(keys, a * n, r * n);
      Tensor H = b.E.defined() ? b.G.to(at::kFloat) + b.E : b.G.to(at::kFloat);
      R.view({B, -1}).copy_(H.reshape({B, -1}).gather(1, idx));
      if (unused[i].defined()) R.masked_fill_(unused[i], 0.0);
      if (b.E.defined()) {
        const Tensor update = unused[i].defined() ? update_now.logical_and(unused[i].logical_not()) : update_now;
        b.E.copy_(at::where(update, H.reshape({B, -1}).scatter(1, idx, 0.0).view({B, a, n}), b.E));
      }
      draws.push_back(idx);
      scales.push_back(unbiased ? static_cast<double>(a) / r : 1.0);
    } else {
      Tensor P = frame(sketch, keys, a, r, unbiased);
      if (unused[i].defined()) P = at::where(unused[i], at::zeros_like(P), P);
      Tensor E = b.E.defined() ? b.E : at::zeros({B, a, n}, fopts);
      call0("lorecomm::project_residual", {b.G, E, P, R, update_now});
      draws.push_back(P);
      scales.push_back(unbiased && sketch == "haar" ? static_cast<double>(a) / r : 1.0);
    }
  }
  Tensor dense = wire.narrow(0, factors, dense_numel);
  gather_ranges(buf, dense_ranges, dense);
  // 3. factor (+ dense) all-reduce; a skipped step reaches the optimizer as non-finite
  comm.all_reduce_mean(wire, "factor");
  wire.narrow(0, 0, factors).add_(poison(ok_now));
  Tensor local = deferred ? buf.clone() : Tensor();
  // 4. decompress into the bucket, dense leftovers back
  pos = 0;
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    const int64_t B = b.B(), a = b.a(), n = b.b(), r = b.rank;
    Tensor Rbar = wire.narrow(0, pos, B * r * n).view({B, r, n});
    pos += B * r * n;
    if (sketch == "randk") {
      Tensor full = at::zeros({B, a * n}, fopts);
      full.scatter_(1, draws[i], Rbar.reshape({B, -1}).mul(scales[i]));
      b.G.copy_(full.view({B, a, n}));
    } else {
      call0("lorecomm::decompress", {draws[i].mul(scales[i]), Rbar, b.G});
    }
  }
  scatter_ranges(dense, dense_ranges, buf);
  Tensor ok_final = ok_now;
  if (deferred) {
    ok_final = ok_now.logical_and(at::isfinite(buf).all());
    for (size_t i = 0; i < batches.size(); ++i) {
      const auto& b = batches[i];
      Tensor G0 = local.as_strided(b.G.sizes(), b.G.strides(), b.G.storage_offset() - buf.storage_offset());
      if (sketch == "randk") {
        Tensor H = G0.to(at::kFloat) + b.E;
        const Tensor update = unused[i].defined() ? ok_final.logical_and(unused[i].logical_not()) : ok_final;
        b.E.copy_(at::where(update, H.reshape({b.B(), -1}).scatter(1, draws[i], 0.0).view_as(b.E), b.E));
      } else {
        Tensor scratch = at::empty({b.B(), b.rank, b.b()}, fopts);
        call0("lorecomm::project_residual", {G0, b.E, draws[i], scratch, ok_final});
      }
    }
  }
  ok.copy_(ok_final);
}

}  // namespace lorecomm::steps
