"""Shared random draws, the readable reference of what the engine derives on device.

Every rank draws the same matrices from one key (``probes.probe_key`` of seed,
step, parameter id and stream) without communicating; the engine
(csrc/steps/) computes them from the same Philox probes
(``torch.ops.lorecomm.probe_normal``), the float64 simulation
(``lorecomm.simulate``) from these functions, so both see the same randomness
(up to the last ulp of the probes' log/cos).
"""
from __future__ import annotations

import numpy as np
import torch

from .probes import probe_matrix, randn


def random_indices(key: int, n: int, r: int) -> torch.Tensor:
    """r distinct indices out of range(n), sorted (int64): the r smallest of n shared N(0, 1) draws."""
    draws = randn(key, np.arange(n, dtype=np.uint64))
    return torch.from_numpy(np.sort(np.argsort(draws, kind="stable")[:r]).astype(np.int64))


def haar_frame(key: int, a: int, r: int) -> torch.Tensor:
    """a x r matrix with orthonormal columns, Haar distributed (float64): the sign-fixed
    Q factor of the key's a x r Gaussian probe block."""
    q, rr = torch.linalg.qr(probe_matrix(key, a, r).double())
    d = torch.sign(torch.diagonal(rr))
    return q * torch.where(d == 0, torch.ones_like(d), d)


def gaussian_frame(key: int, a: int, r: int) -> torch.Tensor:
    """a x r matrix of i.i.d. N(0, 1) entries (float64): the key's probe block; callers scale it."""
    return probe_matrix(key, a, r).double()
