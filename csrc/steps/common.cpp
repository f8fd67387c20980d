#include "common.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

namespace lorecomm::steps {
namespace {

std::string describe(const Tensor& t) {
  if (!t.defined()) return "undefined";
  std::ostringstream s;
  s << t.scalar_type() << t.sizes() << " on " << t.device();
  return s.str();
}

}  // namespace

Tensor call1(const char* name, std::vector<c10::IValue> args) {
  torch::jit::Stack stack(std::move(args));
  c10::Dispatcher::singleton().findSchemaOrThrow(name, "").callBoxed(stack);
  TORCH_CHECK(stack.size() == 1 && stack[0].isTensor(), name, " did not return one tensor");
  return std::move(stack[0]).toTensor();
}

void call0(const char* name, std::vector<c10::IValue> args) {
  torch::jit::Stack stack(std::move(args));
  c10::Dispatcher::singleton().findSchemaOrThrow(name, "").callBoxed(stack);
}

Tensor keys_for(const Batch& b, int64_t seed, int64_t step, int64_t stream) {
  return call1("lorecomm::probe_keys", {b.ids, seed, step, stream});
}

void check_batches(const std::vector<Batch>& batches, const Tensor& buffer, bool need_E, bool need_ids) {
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    TORCH_CHECK(b.G.defined() && b.G.dim() == 3, "batch ", i, ": G must be (B, a, b), got ", describe(b.G));
    TORCH_CHECK(b.G.scalar_type() == buffer.scalar_type(), "batch ", i, ": G must have the bucket's dtype");
    std::vector<const Tensor*> on_device{&b.G};
    if (need_E || b.E.defined()) {
      TORCH_CHECK(b.E.defined() && b.E.sizes() == b.G.sizes() && b.E.scalar_type() == at::kFloat,
                  "batch ", i, ": E must be float32 ", b.G.sizes(), ", got ", describe(b.E));
      on_device.push_back(&b.E);
    }
    if (need_ids) {
      TORCH_CHECK(b.ids.defined() && b.ids.dim() == 1 && b.ids.size(0) == b.G.size(0) &&
                      b.ids.scalar_type() == at::kLong,
                  "batch ", i, ": ids must be int64 (", b.G.size(0), ",), got ", describe(b.ids));
      on_device.push_back(&b.ids);
    }
    TORCH_CHECK(b.rank >= 1 && b.rank <= b.G.size(1), "batch ", i, ": rank ", b.rank, " must be in [1, ",
                b.G.size(1), "]");
    if (b.U.defined()) on_device.push_back(&b.U);
    if (b.Q.defined()) on_device.push_back(&b.Q);
    for (const auto* t : on_device)
      TORCH_CHECK(t->device() == buffer.device(), "batch ", i, ": every tensor must be on the bucket's device ",
                  buffer.device(), ", got ", describe(*t));
  }
}

void check_ranges(const Ranges& ranges, const Tensor& buffer) {
  for (const auto& [s, e] : ranges)
    TORCH_CHECK(0 <= s && s <= e && e <= buffer.numel(), "dense range [", s, ", ", e,
                ") outside the bucket of ", buffer.numel(), " elements");
}

int64_t numel_of(const Ranges& ranges) {
  int64_t n = 0;
  for (const auto& [s, e] : ranges) n += e - s;
  return n;
}

void gather_ranges(const Tensor& buf, const Ranges& ranges, const Tensor& out) {
  int64_t pos = 0;
  for (const auto& [s, e] : ranges) {
    out.narrow(0, pos, e - s).copy_(buf.narrow(0, s, e - s));
    pos += e - s;
  }
}

void scatter_ranges(const Tensor& src, const Ranges& ranges, const Tensor& buf) {
  int64_t pos = 0;
  for (const auto& [s, e] : ranges) {
    buf.narrow(0, s, e - s).copy_(src.narrow(0, pos, e - s));
    pos += e - s;
  }
}

Tensor poison(const Tensor& ok) {
  const auto o = ok.options().dtype(at::kFloat);
  return at::where(ok, at::scalar_tensor(0.0, o), at::scalar_tensor(std::nan(""), o));
}

Tensor nonzero_matrices(const Tensor& X) {
  return at::linalg_vector_norm(X, INFINITY, {1, 2}, false, at::kFloat).ne(0);  // no |X| temporary
}

int64_t matrices_of(const std::vector<Batch>& batches) {
  int64_t n = 0;
  for (const auto& b : batches) n += b.B();
  return n;
}

void used_flags(const std::vector<Batch>& batches, const Tensor& out) {
  int64_t pos = 0;
  for (const auto& b : batches) {
    out.narrow(0, pos, b.B()).copy_(nonzero_matrices(b.G));
    pos += b.B();
  }
}

std::vector<Tensor> unused_masks(const std::vector<Batch>& batches, const Tensor& reduced) {
  std::vector<Tensor> masks;
  int64_t pos = 0;
  for (const auto& b : batches) {
    masks.push_back(reduced.narrow(0, pos, b.B()).eq(0).view({-1, 1, 1}));
    pos += b.B();
  }
  return masks;
}

Tensor random_indices(const Tensor& keys, int64_t n, int64_t r) {
  // the r smallest of n shared N(0,1) draws per matrix: a uniformly random r-subset
  Tensor u = call1("lorecomm::probe_normal", {keys, int64_t{1}, n}).squeeze(1);
  Tensor idx = std::get<1>(u.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/false)).narrow(-1, 0, r);
  return std::get<0>(idx.sort(-1));
}

Tensor orthonormal_columns(const Tensor& Y) {
  // in Y's precision: in float32 Householder QR takes half the float64 time (which on Lore's
  // step path was nearly a sketch GEMM), and Q is orthonormal to float32 rounding whatever Y's
  // conditioning
  auto [q, rr] = at::linalg_qr(Y.scalar_type() == at::kDouble ? Y : Y.to(at::kFloat));
  Tensor d = rr.diagonal(0, -2, -1).sign();
  d = at::where(d == 0, at::ones_like(d), d);
  // LAPACK's Q is column-major: the sign fix (exact) writes it row-major in one pass (the ops
  // read V row by row; each would otherwise copy it; to(kFloat, Contiguous) would not: a 3-D
  // tensor's suggested format is always Contiguous)
  Tensor v = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  return at::mul_out(v, q, d.unsqueeze(-2));
}

}  // namespace lorecomm::steps
