// lorecomm::refresh_basis (docs/OPS.md): the full basis of a refresh step.
//
// Composed of ATen ops (float64 Gram matrix, symmetric eigensolver), so one
// kernel serves every device and the Python reference path and the engine,
// which both call it through the dispatcher, produce the same bits.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace lorecomm {
namespace {

// (B, a, b) -> (B, a, a) float32: orthonormal left singular vectors of each
// matrix by descending singular value, each column's largest-magnitude entry
// positive (first on ties); non-finite entries count as 0. Through the a x a
// Gram matrix: only orthonormality and completeness matter for the r/a
// contraction, and a <= b after orientation keeps it the small side.
at::Tensor refresh_basis(const at::Tensor& H) {
  TORCH_CHECK(H.dim() == 3, "refresh_basis: H must be (B, a, b), got ", H.sizes());
  TORCH_CHECK(at::isFloatingType(H.scalar_type()), "refresh_basis: H must be floating point, got ",
              H.scalar_type());
  const at::Tensor h = at::nan_to_num(H.to(at::kDouble), 0.0, 0.0, 0.0);
  const at::Tensor vecs = std::get<1>(at::linalg_eigh(at::matmul(h, h.transpose(-1, -2))));
  const at::Tensor U = vecs.flip({-1});
  const at::Tensor s = at::sign(U.gather(-2, U.abs().argmax(-2, /*keepdim=*/true)));
  return (U * at::where(s == 0, at::ones_like(s), s)).to(at::kFloat).contiguous();
}

}  // namespace
}  // namespace lorecomm

TORCH_LIBRARY_IMPL(lorecomm, CompositeExplicitAutograd, m) {
  m.impl("refresh_basis", &lorecomm::refresh_basis);
}
