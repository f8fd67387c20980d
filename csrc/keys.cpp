// lorecomm::probe_keys (docs/OPS.md): the Philox keys of a batch of matrices
// for one (seed, step, stream), on the ids' device. The same splitmix64 chain as
// lorecomm.probes.probe_key; the per-step prefix is host integer maths, the
// per-parameter part wrapping int64 tensor ops, so the engine derives its keys
// without a host-to-device copy. One ATen composite kernel serves every device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

namespace lorecomm {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL, kMul1 = 0xBF58476D1CE4E5B9ULL, kMul2 = 0x94D049BB133111EBULL;

uint64_t splitmix64(uint64_t x) {
  x += kGolden;
  x = (x ^ (x >> 30)) * kMul1;
  x = (x ^ (x >> 27)) * kMul2;
  return x ^ (x >> 31);
}

int64_t as_i64(uint64_t x) { return static_cast<int64_t>(x); }

// logical right shift of int64 values (torch's >> is arithmetic on signed types)
at::Tensor lsr(const at::Tensor& x, int s) { return at::bitwise_and(at::bitwise_right_shift(x, s), as_i64(~0ULL >> s)); }

// splitmix64 on int64 tensors: add and multiply wrap modulo 2**64 like uint64
at::Tensor splitmix64(at::Tensor x) {
  x = x.add(as_i64(kGolden));
  x = at::bitwise_xor(x, lsr(x, 30)).mul(as_i64(kMul1));
  x = at::bitwise_xor(x, lsr(x, 27)).mul(as_i64(kMul2));
  return at::bitwise_xor(x, lsr(x, 31));
}

at::Tensor probe_keys(const at::Tensor& ids, int64_t seed, int64_t step, int64_t stream) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "probe_keys: ids must be a 1-D int64 tensor, got ",
              ids.scalar_type(), ids.sizes());
  const uint64_t h = splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(step));
  at::Tensor x = splitmix64(at::bitwise_xor(ids, as_i64(h)));
  x = splitmix64(at::bitwise_xor(x, stream));
  return at::bitwise_and(x, as_i64(~0ULL >> 1));
}

}  // namespace
}  // namespace lorecomm

TORCH_LIBRARY_IMPL(lorecomm, CompositeExplicitAutograd, m) {
  m.impl("probe_keys", &lorecomm::probe_keys);
}
