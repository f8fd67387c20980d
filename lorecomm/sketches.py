"""Shared random draws: every rank derives the same matrices from one key.

Used by the runtime and by the float64 simulation alike, so both draw the
same random columns and frames. Keys come from ``probes.probe_key``.
"""
from __future__ import annotations

import torch


def _generator(key: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(key)
    return g


def random_columns(key: int, a: int, r: int) -> torch.Tensor:
    """r distinct indices out of range(a), sorted (int64, CPU)."""
    return torch.randperm(a, generator=_generator(key))[:r].sort().values


def random_coordinates(key: int, d: int, k: int) -> torch.Tensor:
    """k distinct coordinates out of range(d), sorted (int64, CPU)."""
    return torch.randperm(d, generator=_generator(key))[:k].sort().values


def haar_frame(key: int, a: int, r: int) -> torch.Tensor:
    """a x r matrix with orthonormal columns, Haar distributed (float64, CPU)."""
    x = torch.randn(a, r, generator=_generator(key), dtype=torch.float64)
    q, rr = torch.linalg.qr(x)
    # fix QR's sign convention so the frame is Haar distributed
    return q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(()))


def gaussian_frame(key: int, a: int, r: int) -> torch.Tensor:
    """a x r matrix of i.i.d. N(0, 1) entries (float64, CPU); callers scale it."""
    return torch.randn(a, r, generator=_generator(key), dtype=torch.float64)
