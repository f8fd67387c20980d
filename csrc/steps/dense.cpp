// Dense averaging on the engine: the warm-up phase of every compressor and the
// DenseState baseline. Without a wire dtype this is DDP's own hook, bit for bit
// (divide by N, then sum all-reduce in the bucket's dtype).
#include "steps.h"

namespace lorecomm::steps {

void DenseStep::run(engine::Comm& comm) {
  if (!wire || *wire == buffer.scalar_type()) {
    comm.all_reduce_mean(buffer, "dense");
    return;
  }
  Tensor w = buffer.to(*wire);
  comm.all_reduce_mean(w, "dense");
  buffer.copy_(w);
}

}  // namespace lorecomm::steps
