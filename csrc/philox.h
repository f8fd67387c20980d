// Counter-based Gaussian probes, bit-for-bit the integer recipe of
// triton.language.randn(key, offset) (see lorecomm/probes.py, docs/OPS.md):
// Philox4x32-10 with key (key & 0xffffffff, key >> 32) and counter
// (offset & 0xffffffff, offset >> 32, 0, 0); outputs c0, c1 -> uniform via
// Triton's uint_to_uniform_float -> Box-Muller in float32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace lorecomm {

// First two outputs of Philox4x32-10.
inline void philox4x32_10(uint64_t key, uint64_t offset, uint32_t& o0, uint32_t& o1) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key);
  uint32_t k1 = static_cast<uint32_t>(key >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p2 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  o0 = c0;
  o1 = c1;
}

// triton.language.random.uint_to_uniform_float for uint32.
inline float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * 4.6566127342e-10f;
}

inline float box_muller(float u1, float u2) {
  u1 = std::max(1.0e-7f, u1);
  const float th = 6.283185307179586f * u2;
  const float r = std::sqrt(-2.0f * std::log(u1));
  return r * std::cos(th);
}

// randn(key, offset) for one offset.
inline float randn(uint64_t key, uint64_t offset) {
  uint32_t i1, i2;
  philox4x32_10(key, offset, i1, i2);
  return box_muller(uint_to_uniform(i1), uint_to_uniform(i2));
}

// out[t] = randn(key, offset + t) for t in [0, n). The integer part runs in
// fixed-size chunks so the compiler vectorises it; log/cos stay scalar libm.
inline void randn_fill(uint64_t key, uint64_t offset, int64_t n, float* out) {
  constexpr int64_t kChunk = 256;
  alignas(64) float u1[kChunk];
  alignas(64) float u2[kChunk];
  for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
    const int64_t m = std::min(kChunk, n - t0);
    const uint64_t base = offset + static_cast<uint64_t>(t0);
    for (int64_t t = 0; t < m; ++t) {
      uint32_t i1, i2;
      philox4x32_10(key, base + static_cast<uint64_t>(t), i1, i2);
      u1[t] = uint_to_uniform(i1);
      u2[t] = uint_to_uniform(i2);
    }
    for (int64_t t = 0; t < m; ++t) out[t0 + t] = box_muller(u1[t], u2[t]);
  }
}

}  // namespace lorecomm
