// Dense averaging on the engine: the warm-up phase of every compressor, the DenseState baseline,
// and a bucket a compressor hands back to dense. Without a wire dtype or a flush this is DDP's
// own hook, bit for bit (divide by N, then sum all-reduce in the bucket's dtype).
#include "steps.h"

namespace lorecomm::steps {

void DenseStep::check() const { check_batches(flush, buffer, /*need_E=*/true, /*need_ids=*/false); }

void DenseStep::tensors(std::vector<at::Tensor>& out) const {
  out.push_back(buffer);
  for (auto& t : batch_tensors(flush)) out.push_back(t);
}

void DenseStep::run(engine::Comm& comm) {
  // skip_unused: per flushed matrix, whether some rank used it ((B, 1, 1) per batch) and whether
  // some rank's E is not zero ((B,)), both from one all-reduce so that `owes` is the same on every
  // rank (E is each rank's own: deciding on the local E alone, ranks would disagree about the next
  // step's collectives)
  std::vector<Tensor> used(flush.size()), owed(flush.size());
  if (skip_unused && !flush.empty()) {
    Tensor flags = at::empty({2, matrices_of(flush)}, buffer.options().dtype(at::kFloat));
    used_flags(flush, flags[0]);
    int64_t pos = 0;
    for (const auto& b : flush) {
      flags[1].narrow(0, pos, b.B()).copy_(nonzero_matrices(b.E));
      pos += b.B();
    }
    comm.all_reduce_sum(flags, "used flags");
    const std::vector<Tensor> unused = unused_masks(flush, flags[0]);
    pos = 0;
    for (size_t i = 0; i < flush.size(); ++i) {
      used[i] = unused[i].logical_not();
      owed[i] = flags[1].narrow(0, pos, flush[i].B()).ne(0);
      pos += flush[i].B();
    }
  }
  // what the compressor still owed; an unused matrix's would go into DDP's dropped output
  for (size_t i = 0; i < flush.size(); ++i)
    flush[i].G.add_(used[i].defined() ? at::where(used[i], flush[i].E, 0.0) : flush[i].E);
  if (!wire || *wire == buffer.scalar_type()) {
    comm.all_reduce_mean(buffer, "dense");
  } else {
    Tensor w = buffer.to(*wire);
    comm.all_reduce_mean(w, "dense");
    buffer.copy_(w);
  }
  if (!flush.empty()) {
    ok = at::isfinite(buffer).all();  // a skipped step keeps what it owed
    owes = ok.logical_not();
    for (size_t i = 0; i < flush.size(); ++i) {
      const auto& b = flush[i];
      if (!used[i].defined()) {
        b.E.masked_fill_(ok, 0.0);
        continue;
      }
      owes = owes.logical_or(used[i].logical_not().view({-1}).logical_and(owed[i]).any());
      b.E.masked_fill_(ok.logical_and(used[i]), 0.0);
    }
  }
}

}  // namespace lorecomm::steps
