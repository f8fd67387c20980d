// GreedyLore (Chen et al., arXiv 2507.08784) on the engine: the paper's
// algorithm as it states it, with its ablations.
//
//   refresh:     H = G + E in an fp32 copy of the bucket -> all-reduce (mean)
//                -> per batch a new basis (torch.ops.lorecomm.refresh_basis)
//                where the mean bucket is finite, E = 0 -> MAX all-reduce of
//                (checksum, -checksum) per matrix -> broadcast of the bases from
//                the group's rank 0 where any rank differs -> bucket = mean H.
//   compressed:  greedy: scores (score_paper | score_sketch, keys from (seed,
//                step, parameter id)) -> score all-reduce (mean) -> global
//                finite flag and top-r selection on device (stable sort, ties
//                to the lower index); fixed / random ablations: the picks are
//                given (the first r / r random columns of U) and a one-float
//                all-reduce carries the finite flag
//                -> project_residual into the factor buffer, dense leftovers
//                packed after the factors -> factor all-reduce (mean) -> NaN
//                poisoning of a non-finite step -> decompress into the bucket,
//                dense leftovers scattered back.
// With skip_unused (DDP with find_unused_parameters / static_graph drops the
// output of a parameter no rank used) one flag per matrix rides after the
// scores (or the finite flag), on refresh steps in one small all-reduce before
// the dense one: a matrix no rank used sends 0, keeps its E exactly (and its
// basis), and what it owes is sent when it is used again.
// An fp16 bucket whose decompressed values overflow counts as non-finite: its
// error buffers are updated only after the output was checked (from a copy of
// the local gradient), so they stay untouched then.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "common.h"
#include "steps.h"

namespace lorecomm::steps {
namespace {

constexpr int64_t kScoreStream = 0, kSelectStream = 1;

// One int64 per matrix that changes with any bit of it (wrapping arithmetic),
// as lorecomm.state.bitwise_checksum.
Tensor bitwise_checksum(const Tensor& U) {
  Tensor bits = U.contiguous().view(at::kInt).reshape({U.size(0), -1}).to(at::kLong);
  Tensor weights = at::arange(1, bits.size(1) + 1, bits.options());
  return (bits * weights).sum(-1);
}

}  // namespace

std::vector<int64_t> ensure_identical(engine::Comm& comm, const std::vector<Tensor>& bases) {
  std::vector<int64_t> repaired(bases.size(), 0);
  if (bases.empty()) return repaired;
  // one MAX all-reduce of (checksum, -checksum) per matrix: max(x) == -max(-x) iff every rank agrees
  std::vector<Tensor> sums;
  for (const auto& U : bases) sums.push_back(bitwise_checksum(U));
  Tensor all = at::cat(sums);
  Tensor both = at::cat({all, all.neg()});
  comm.all_reduce_max(both, "basis checksum");
  const int64_t n = all.numel();
  // the one host read of this compressor: which bases to broadcast (refresh steps only)
  Tensor differs = both.narrow(0, 0, n).ne(both.narrow(0, n, n).neg()).cpu();
  const bool* d = differs.data_ptr<bool>();
  int64_t pos = 0;
  for (size_t i = 0; i < bases.size(); ++i) {
    const int64_t B = bases[i].size(0);
    if (std::any_of(d + pos, d + pos + B, [](bool x) { return x; })) {
      comm.broadcast(bases[i], "basis repair");
      repaired[i] = 1;
    }
    pos += B;
  }
  return repaired;
}

std::string GreedyLoreStep::kind() const { return refresh ? "greedylore refresh" : "greedylore compressed"; }

void GreedyLoreStep::check() const {
  check_batches(batches, buffer, /*need_E=*/true, /*need_ids=*/true);
  check_ranges(dense_ranges, buffer);
  TORCH_CHECK(!batches.empty(), "a GreedyLore step needs at least one compressed matrix");
  TORCH_CHECK(selection == "greedy" || selection == "fixed" || selection == "random",
              "selection must be greedy, fixed or random, got ", selection);
  TORCH_CHECK(sketch_k >= 0, "sketch_k must be >= 0");
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    TORCH_CHECK(b.U.defined() && b.U.dim() == 3 && b.U.size(0) == b.B() && b.U.size(1) == b.a() &&
                    b.U.size(2) == b.a() && b.U.scalar_type() == at::kFloat,
                "batch ", i, ": U must be float32 (", b.B(), ", ", b.a(), ", ", b.a(), ")");
  }
}

void GreedyLoreStep::tensors(std::vector<at::Tensor>& out) const {
  out.push_back(buffer);
  for (auto& t : batch_tensors(batches)) out.push_back(t);
  out.push_back(ok);
}

void GreedyLoreStep::run(engine::Comm& comm) {
  if (refresh)
    run_refresh(comm);
  else
    run_compressed(comm);
}

void GreedyLoreStep::run_compressed(engine::Comm& comm) {
  const auto& buf = buffer;
  const auto fopts = buf.options().dtype(at::kFloat);
  const bool deferred = buf.scalar_type() == at::kHalf;  // E only after the fp16 output is checked
  int64_t factors = 0;
  for (const auto& b : batches) factors += b.B() * b.rank * b.b();
  const int64_t dense_numel = numel_of(dense_ranges);
  Tensor wire = at::empty({factors + dense_numel}, fopts);
  Tensor dense = wire.narrow(0, factors, dense_numel);
  gather_ranges(buf, dense_ranges, dense);
  const int64_t matrices = matrices_of(batches);
  std::vector<Tensor> picks, unused(batches.size());
  Tensor ok_now;
  if (selection != "greedy") {
    // given selections: only the global finite flag (and the used flags) travel before the factors
    Tensor bad = at::zeros({1 + (skip_unused ? matrices : 0)}, fopts);
    bad.narrow(0, 0, 1).add_(at::isfinite(buf).logical_not().any());
    if (skip_unused) used_flags(batches, bad.narrow(0, 1, matrices));
    comm.all_reduce_mean(bad, "finite-flag");
    ok_now = bad.select(0, 0).eq(0);
    if (skip_unused) unused = unused_masks(batches, bad.narrow(0, 1, matrices));
    for (const auto& b : batches) {
      if (selection == "fixed")
        picks.push_back(at::arange(b.rank, b.ids.options()).expand({b.B(), b.rank}));
      else
        picks.push_back(random_indices(keys_for(b, seed, step, kSelectStream), b.a(), b.rank));
    }
  } else {
    // 1. scores of every batch (H = G + E never materialised), back to back
    std::vector<Tensor> scores;
    for (auto& b : batches) {
      Tensor keys = keys_for(b, seed, step, kScoreStream);
      Tensor lam = sketch_k > 0 ? call1("lorecomm::score_sketch", {b.G, b.E, b.U, keys, sketch_k})
                                : call1("lorecomm::score_paper", {b.G, b.E, b.U, keys});
      scores.push_back(lam.reshape({-1}));
    }
    int64_t nscores = 0;
    for (const auto& x : scores) nscores += x.numel();
    if (skip_unused) scores.push_back(at::empty({matrices}, fopts));  // the used flags ride after the scores
    Tensor flat = at::cat(scores);
    if (skip_unused) used_flags(batches, flat.narrow(0, nscores, matrices));
    // a non-finite dense leftover must skip the step too: its NaN rides in the
    // first score (x + 0.0 leaves every score as it was otherwise)
    if (dense_numel > 0) flat.narrow(0, 0, 1).add_(poison(at::isfinite(dense).all()));
    // 2. averaged signed scores
    comm.all_reduce_mean(flat, "score");
    // 3. global finite flag and greedy selection, on device
    ok_now = at::isfinite(flat).all();
    if (skip_unused) unused = unused_masks(batches, flat.narrow(0, nscores, matrices));
    int64_t pos = 0;
    for (size_t i = 0; i < batches.size(); ++i) {
      const auto& b = batches[i];
      const int64_t n = scores[i].numel();
      Tensor energy = flat.narrow(0, pos, n).view({b.B(), b.a(), -1}).square().mean(-1);
      pos += n;
      // stable descending sort: ties go to the lower index, on every rank alike
      Tensor idx = std::get<1>(energy.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
      picks.push_back(idx.narrow(-1, 0, b.rank));
    }
  }
  const Tensor no = at::zeros_like(ok_now);
  const Tensor update_now = (error_feedback && !deferred) ? ok_now : no;
  // 4. project + residual into the factor buffer (the dense leftovers follow the factors)
  std::vector<std::pair<Tensor, Tensor>> PR;
  int64_t pos = 0;
  for (size_t i = 0; i < batches.size(); ++i) {
    auto& b = batches[i];
    const int64_t B = b.B(), a = b.a(), n = b.b(), r = b.rank;
    Tensor P = b.U.gather(2, picks[i].unsqueeze(1).expand({B, a, r}));
    // a matrix no rank used (skip_unused) is projected on P = 0: it sends R = 0 and keeps E exactly
    if (unused[i].defined()) P = at::where(unused[i], at::zeros_like(P), P);
    Tensor R = wire.narrow(0, pos, B * r * n).view({B, r, n});
    call0("lorecomm::project_residual", {b.G, b.E, P, R, update_now});
    PR.emplace_back(P, R);
    pos += B * r * n;
  }
  // 5. factor (+ dense) all-reduce
  comm.all_reduce_mean(wire, "factor");
  // a skipped (non-finite) step must reach the optimizer as non-finite on every rank
  wire.narrow(0, 0, factors).add_(poison(ok_now));
  Tensor local = deferred ? buf.clone() : Tensor();
  // 6. decompress into the bucket, dense leftovers back
  for (size_t i = 0; i < batches.size(); ++i)
    call0("lorecomm::decompress", {PR[i].first, PR[i].second, batches[i].G});
  scatter_ranges(dense, dense_ranges, buf);
  Tensor ok_final = ok_now;
  if (deferred) {
    ok_final = ok_now.logical_and(at::isfinite(buf).all());
    if (error_feedback) {
      for (size_t i = 0; i < batches.size(); ++i) {
        const auto& b = batches[i];
        Tensor G0 = local.as_strided(b.G.sizes(), b.G.strides(), b.G.storage_offset() - buf.storage_offset());
        Tensor scratch = at::empty_like(PR[i].second);
        call0("lorecomm::project_residual", {G0, b.E, PR[i].first, scratch, ok_final});
      }
    }
  }
  ok.copy_(ok_final);
}

void GreedyLoreStep::run_refresh(engine::Comm& comm) {
  const auto& buf = buffer;
  Tensor h = buf.scalar_type() == at::kFloat ? buf : buf.to(at::kFloat);
  // the batch's strided view of G, taken in the fp32 copy
  auto view_in = [&](const Tensor& base, const Tensor& G) {
    return base.as_strided(G.sizes(), G.strides(), base.storage_offset() + G.storage_offset() - buf.storage_offset());
  };
  // skip_unused: the matrices no rank used, from one small all-reduce first; they send G = 0 (their
  // output is dropped), keep E for when they are used again, and keep their basis
  std::vector<Tensor> unused(batches.size());
  if (skip_unused) {
    Tensor flags = at::empty({matrices_of(batches)}, buf.options().dtype(at::kFloat));
    used_flags(batches, flags);
    comm.all_reduce_mean(flags, "used-flags");
    unused = unused_masks(batches, flags);
  }
  // 1. dense all-reduce of the error-corrected gradient
  if (error_feedback)
    for (size_t i = 0; i < batches.size(); ++i) {
      const auto& b = batches[i];
      view_in(h, b.G).add_(unused[i].defined() ? b.E.masked_fill(unused[i], 0.0) : b.E);
    }
  comm.all_reduce_mean(h, "refresh");
  if (!h.is_same(buf)) buf.copy_(h);
  // 2. new bases where the whole mean bucket is finite (in the bucket's dtype), error buffers reset
  Tensor okv = at::isfinite(buf).all();
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    const Tensor update = unused[i].defined() ? okv.logical_and(unused[i].logical_not()) : okv;
    b.U.copy_(at::where(update, call1("lorecomm::refresh_basis", {view_in(h, b.G)}), b.U));
    b.E.masked_fill_(update, 0.0);
  }
  ok.copy_(okv);
  // 3. bit-identical bases on every rank: compare checksums, repair from rank 0
  std::vector<Tensor> bases;
  for (const auto& b : batches) bases.push_back(b.U);
  repairs = ensure_identical(comm, bases);
}

// check_consistency(): the shared state of every matrix, checksummed across ranks, repaired from rank 0.
std::string ConsistencyStep::kind() const { return "state consistency check"; }

void ConsistencyStep::check() const {
  for (size_t i = 0; i < shared.size(); ++i)
    TORCH_CHECK(shared[i].dim() == 3 && shared[i].scalar_type() == at::kFloat && shared[i].is_contiguous(),
                "shared state ", i, " must be a contiguous float32 (B, x, y) tensor");
}

void ConsistencyStep::tensors(std::vector<at::Tensor>& out) const {
  out.push_back(buffer);
  for (const auto& t : shared) out.push_back(t);
}

void ConsistencyStep::run(engine::Comm& comm) { repairs = ensure_identical(comm, shared); }

}  // namespace lorecomm::steps
