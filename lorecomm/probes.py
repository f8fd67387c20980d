"""Counter-based Gaussian probes shared by every rank and every device.

A probe value is a pure function of (key, offset): Philox4x32-10 followed by
Triton's ``uint_to_uniform_float`` and Box-Muller, bit-for-bit the recipe of
``triton.language.randn(key, offset)``. The C++ CPU ops and the Triton kernels
generate the same numbers in-kernel; this module is the readable reference
(numpy integer maths, float32 transcendental maths) used by the Python path
and the tests. Values may differ from the kernels in the last ulp of
log/cos, never more.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK32 = np.uint64(0xFFFFFFFF)
_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def probe_key(seed: int, step: int, param_id: int, stream: int = 0) -> int:
    """The Philox key of one matrix's probes at one step, in [0, 2**63).

    Every rank derives the same key from (seed, step, parameter id), so the
    probes are shared without communication. ``stream`` separates independent
    uses (0: score probes, 1: random selection, 2: random linear sketches).
    """
    h = _splitmix64(seed & _MASK64)
    for part in (step, param_id, stream):
        h = _splitmix64(h ^ (part & _MASK64))
    return h & _MASK63


def philox_uint32x2(key: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two 32-bit outputs of Philox4x32-10 with counter (offset, 0, 0, 0)."""
    off = np.asarray(offsets, dtype=np.uint64)
    c0 = off & _MASK32
    c1 = off >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint64(key & 0xFFFFFFFF)
    k1 = np.uint64((key >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = _ROUND_A * c0  # < 2**64: exact in uint64
        p2 = _ROUND_B * c2
        n0 = (p2 >> np.uint64(32)) ^ c1 ^ k0
        n2 = (p0 >> np.uint64(32)) ^ c3 ^ k1
        c1 = p2 & _MASK32
        c3 = p0 & _MASK32
        c0, c2 = n0, n2
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0.astype(np.uint32), c1.astype(np.uint32)


def _uint_to_uniform(x: np.ndarray) -> np.ndarray:
    s = x.view(np.int32)
    s = np.where(s < 0, ~s, s)
    return s.astype(np.float32) * np.float32(4.6566127342e-10)


def uniform(key: int, offsets) -> np.ndarray:
    """float32 U[0, 1) samples, identical to ``tl.rand(key, offsets)``."""
    i1, _ = philox_uint32x2(key, offsets)
    return _uint_to_uniform(i1)


def coin(seed: int, step: int, stream: int, p: float) -> bool:
    """A biased coin every rank flips alike: True with probability ``p`` for (seed, step, stream)."""
    return bool(uniform(probe_key(seed, step, 0, stream), np.zeros(1, dtype=np.uint64))[0] < np.float32(p))


def randn(key: int, offsets) -> np.ndarray:
    """float32 N(0, 1) samples, identical to ``tl.randn(key, offsets)``."""
    i1, i2 = philox_uint32x2(key, offsets)
    u1 = np.maximum(np.float32(1.0e-7), _uint_to_uniform(i1))
    u2 = _uint_to_uniform(i2)
    th = np.float32(6.283185307179586) * u2
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return (r * np.cos(th)).astype(np.float32)


def probe_matrix(key: int, rows: int, cols: int) -> torch.Tensor:
    """The (rows x cols) probe block of one key: entry (x, y) is randn(key, x*cols + y)."""
    offsets = np.arange(rows * cols, dtype=np.uint64)
    return torch.from_numpy(randn(key, offsets).reshape(rows, cols))
