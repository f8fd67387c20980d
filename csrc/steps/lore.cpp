// Lore, lorecomm's default compressor, on the engine (docs/LORE.md;
// lorecomm.simulate.SimulatedLore is its float64 reference).
//
// Per oriented a x b matrix with rank r, on a step with `explore` = 1 (the
// Python layer sets it on the steps a shared coin picks, 0 otherwise) k = 1
// random direction replaces the weakest tracked one, or at r = 1 joins the
// one tracked (t = max(r - k, 1) tracked, t + k sent; k = 0 where t = a).
// Every rank holds E_i (its error buffer) and the shared Q (r x b, the last
// step's averaged factors, rows by decreasing energy: PowerSGD's warm start):
//   1. sketch   Y_i = H_i Q[:t]^T with H_i = G_i + E_i           (a x t)
//   2. all-reduce (mean, wire dtype) of every Y_i of the bucket: Ybar
//   3. basis    V = orth([Ybar, W]) (a x (t + k)): the tracked range, plus k
//               fresh Gaussian directions W shared through (seed, step, id)
//   4. project  R_i = V^T H_i rounded to the wire dtype, E_i = H_i - V R_i
//               (the rounding error stays in E)
//   5. all-reduce (mean, wire dtype) of every R_i and the dense leftovers: Rbar
//   6. output   V Rbar into the bucket; Q <- Rbar's r rows of most energy, by
//               decreasing norm.
// The W directions make the compressor a contraction for every X whatever the
// tracked part: E_W ||X - V V^T X||^2 <= (1 - 1/(a - t)) ||X||^2 on an
// exploring step, so (1 - p/(a - t)) over the coin of probability p (a >= 2;
// a 1 x b matrix has no room for W and is sent exactly).
// With skip_unused (DDP with find_unused_parameters / static_graph, which drops
// the output of a parameter no rank used), one flag per matrix rides after the
// sketches: a matrix whose gradient is exactly 0 on every rank is projected on
// V = 0, so it sends R = 0 and keeps its E exactly (and its Q), and what it owes
// is sent when it is used again, not lost.
// A non-finite value anywhere in the bucket (on any rank) rides in the first
// sketch value; the step then reaches the optimizer as NaN and E and Q stay
// as they were. fp16 buckets update E only after their output was checked.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "common.h"
#include "steps.h"

namespace lorecomm::steps {
namespace {

constexpr int64_t kExploreStream = 3, kWarmStream = 4;

// Rbar (B, r, b) with its rows by decreasing energy (ties keep the lower row first).
Tensor by_energy(const Tensor& Rbar) {
  const int64_t B = Rbar.size(0), r = Rbar.size(1);
  Tensor order = std::get<1>(Rbar.square().sum(-1).sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
  // whole rows by index_select on the (B r, b) view: a row copy each, where gather with an
  // expanded index reads one index per element (2x slower on CPU for (8, 64, 1024))
  Tensor rows = order.add(at::arange(B, order.options()).mul_(r).unsqueeze(1)).flatten();
  return Rbar.contiguous().view({B * r, Rbar.size(2)}).index_select(0, rows).view(Rbar.sizes());
}

}  // namespace

void LoreStep::check() const {
  check_batches(batches, buffer, /*need_E=*/true, /*need_ids=*/true);
  check_ranges(dense_ranges, buffer);
  TORCH_CHECK(!batches.empty(), "a compressed step needs at least one compressed matrix");
  TORCH_CHECK(wire == at::kFloat || wire == at::kBFloat16 || wire == at::kHalf,
              "wire dtype must be float32, bfloat16 or float16, got ", wire);
  TORCH_CHECK(explore == 0 || explore == 1, "explore must be 0 or 1 (this step's random directions), got ", explore);
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    TORCH_CHECK(b.Q.defined() && b.Q.dim() == 3 && b.Q.size(0) == b.B() && b.Q.size(1) == b.rank &&
                    b.Q.size(2) == b.b() && b.Q.scalar_type() == at::kFloat,
                "batch ", i, ": Q must be float32 (", b.B(), ", ", b.rank, ", ", b.b(), ")");
  }
}

void LoreStep::tensors(std::vector<at::Tensor>& out) const {
  out.push_back(buffer);
  for (auto& t : batch_tensors(batches)) out.push_back(t);
  out.push_back(ok);
}

void LoreStep::run(engine::Comm& comm) {
  const auto& buf = buffer;
  const auto fopts = buf.options().dtype(at::kFloat);
  const double N = comm.world_size();
  // E and Q only after the output is checked where a finite R can round to inf: an fp16 bucket, or
  // an fp16 wire (a finite sketch does not bound R = V^T H: Q may be small beside a new gradient)
  const bool deferred = buf.scalar_type() == at::kHalf || wire == at::kHalf;
  const int64_t dense_numel = numel_of(dense_ranges);
  int64_t sketch = 0, factors = 0, matrices = 0;
  // the tracked directions of each batch (at least one) and its random ones (`explore`, within a)
  auto t_of = [&](const Batch& b) { return std::max<int64_t>(b.rank - explore, 1); };
  auto k_of = [&](const Batch& b) { return std::min(explore, b.a() - t_of(b)); };
  for (const auto& b : batches) {
    sketch += b.B() * b.a() * t_of(b);
    factors += b.B() * (t_of(b) + k_of(b)) * b.b();
    matrices += b.B();
  }
  // 1. sketches of the tracked range (fp32), then the wire dtype; the used flags after them
  Tensor y = at::empty({sketch + (skip_unused ? matrices : 0)}, fopts);
  int64_t pos = 0;
  for (const auto& b : batches) {
    const int64_t t = t_of(b), n = b.B() * b.a() * t;
    Tensor Qt = b.Q.narrow(1, 0, t);
    y.narrow(0, pos, n).view({b.B(), b.a(), t}).copy_(call1("lorecomm::range_sketch", {b.G, b.E, Qt}));
    pos += n;
  }
  if (skip_unused) used_flags(batches, y.narrow(0, pos, matrices));
  if (dense_numel > 0) {
    // a non-finite dense leftover must skip the step too: its NaN rides in the first sketch value
    Tensor dense = at::empty({dense_numel}, fopts);
    gather_ranges(buf, dense_ranges, dense);
    y.narrow(0, 0, 1).add_(poison(at::isfinite(dense).all()));
  }
  Tensor w1 = y.div_(N).to(wire);
  // 2. averaged sketches
  comm.all_reduce_sum(w1, "sketch");
  const Tensor ok_now = at::isfinite(w1).all();
  // 3. shared bases, 4. project + residual into the factor buffer
  Tensor w2 = at::empty({factors + dense_numel}, fopts.dtype(wire));
  const Tensor update_now = deferred ? at::zeros_like(ok_now) : ok_now;
  std::vector<Tensor> V(batches.size());
  // the matrices no rank used (skip_unused; the same on every rank: read from the reduced flags), as
  // a (B, 1, 1) mask on the device: no host sync
  const std::vector<Tensor> unused = skip_unused ? unused_masks(batches, w1.narrow(0, sketch, matrices))
                                                 : std::vector<Tensor>(batches.size());
  pos = 0;
  int64_t fpos = 0;
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    const int64_t B = b.B(), a = b.a(), n = b.b(), t = t_of(b), k = k_of(b), r = t + k;
    Tensor cols = w1.narrow(0, pos, B * a * t).view({B, a, t}).to(at::kFloat);
    pos += B * a * t;
    if (k > 0) {
      Tensor W = call1("lorecomm::probe_normal", {keys_for(b, seed, step, kExploreStream), a, k});
      cols = at::cat({cols, W}, 2);
    }
    V[i] = orthonormal_columns(cols);
    // an unused matrix (G = 0 on every rank, so H = E) projected on V = 0: R = 0 and E = H - 0 = E
    // exactly, and its output V Rbar = 0
    if (unused[i].defined()) V[i] = at::where(unused[i], at::zeros_like(V[i]), V[i]);
    Tensor R = w2.narrow(0, fpos, B * r * n).view({B, r, n});
    call0("lorecomm::project_residual", {b.G, b.E, V[i], R, update_now});
    fpos += B * r * n;
  }
  Tensor dense = w2.narrow(0, factors, dense_numel);
  gather_ranges(buf, dense_ranges, dense);
  // 5. averaged factors (+ dense leftovers)
  comm.all_reduce_mean(w2, "factor");
  Tensor local = deferred ? buf.clone() : Tensor();
  // 6. output; a skipped (non-finite) step reaches the optimizer as non-finite on every rank
  Tensor bad = poison(ok_now);
  fpos = 0;
  std::vector<Tensor> Rbars(batches.size());
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    const int64_t B = b.B(), n = b.b(), r = t_of(b) + k_of(b);
    Rbars[i] = w2.narrow(0, fpos, B * r * n).view({B, r, n}).to(at::kFloat).add_(bad);
    fpos += B * r * n;
    call0("lorecomm::decompress", {V[i], Rbars[i], b.G});
  }
  scatter_ranges(dense, dense_ranges, buf);
  Tensor ok_final = ok_now;
  if (deferred) {
    ok_final = ok_now.logical_and(at::isfinite(buf).all());
    for (size_t i = 0; i < batches.size(); ++i) {
      const auto& b = batches[i];
      Tensor G0 = local.as_strided(b.G.sizes(), b.G.strides(), b.G.storage_offset() - buf.storage_offset());
      Tensor scratch = at::empty({b.B(), t_of(b) + k_of(b), b.b()}, fopts.dtype(wire));
      call0("lorecomm::project_residual", {G0, b.E, V[i], scratch, ok_final});
    }
  }
  // the next warm start: Rbar's r rows of most energy, by decreasing energy (the weakest are dropped)
  for (size_t i = 0; i < batches.size(); ++i) {
    Tensor next = by_energy(Rbars[i]).narrow(1, 0, batches[i].rank);
    if (unused[i].defined()) next = at::where(unused[i], batches[i].Q, next);  // unused: Q stays
    batches[i].Q.copy_(at::where(ok_final, next, batches[i].Q));
  }
  ok.copy_(ok_final);
}

void LoreWarmupStep::check() const {
  check_batches(batches, buffer, /*need_E=*/false, /*need_ids=*/true);
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    TORCH_CHECK(b.Q.defined() && b.Q.dim() == 3 && b.Q.size(0) == b.B() && b.Q.size(1) == b.rank &&
                    b.Q.size(2) == b.b() && b.Q.scalar_type() == at::kFloat,
                "batch ", i, ": Q must be float32 (", b.B(), ", ", b.rank, ", ", b.b(), ")");
  }
}

void LoreWarmupStep::tensors(std::vector<at::Tensor>& out) const {
  out.push_back(buffer);
  for (auto& t : batch_tensors(batches)) out.push_back(t);
}

void LoreWarmupStep::run(engine::Comm& comm) {
  comm.all_reduce_mean(buffer, "dense");
  // every rank holds the same mean gradient: Q = (V^T Gbar) with V = orth(Gbar Omega)
  for (const auto& b : batches) {
    Tensor gbar = b.G.to(at::kDouble);
    Tensor omega = call1("lorecomm::probe_normal", {keys_for(b, seed, step, kWarmStream), b.b(), b.rank});
    Tensor V = orthonormal_columns(at::matmul(gbar, omega.to(at::kDouble))).to(at::kDouble);
    Tensor Q = by_energy(at::matmul(V.transpose(-1, -2), gbar).to(at::kFloat));
    b.Q.copy_(at::where(at::isfinite(Q).all(), Q, b.Q));
  }
}

}  // namespace lorecomm::steps
