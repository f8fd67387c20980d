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
  for (const auto& b : flush) b.G.add_(b.E);  // what the compressor still owed
  if (!wire || *wire == buffer.scalar_type()) {
    comm.all_reduce_mean(buffer, "dense");
  } else {
    Tensor w = buffer.to(*wire);
    comm.all_reduce_mean(w, "dense");
    buffer.copy_(w);
  }
  if (!flush.empty()) {
    ok = at::isfinite(buffer).all();  // a skipped step keeps what it owed
    for (const auto& b : flush) b.E.masked_fill_(ok, 0.0);
  }
}

}  // namespace lorecomm::steps
