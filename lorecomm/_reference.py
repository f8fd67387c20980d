"""Pure-torch implementations of the ``torch.ops.lorecomm`` contract (docs/OPS.md).

Readable, unfused, float32: the semantics the C++ and Triton ops must match,
and the fallback when the compiled extension is absent. Shapes: G, E (B, a, b);
U (B, a, a); P (B, a, r); R (B, r, b); keys (B,) int64; ok 0-dim bool.
"""
from __future__ import annotations

import torch

from .probes import probe_matrix


def _probes(keys: torch.Tensor, rows: int, cols: int, device) -> torch.Tensor:
    blocks = [probe_matrix(int(k), rows, cols) for k in keys.tolist()]
    return torch.stack(blocks).to(device)


def probe_normal(keys: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return _probes(keys, rows, cols, keys.device)


def score_paper(G, E, U, keys):
    a, b = G.shape[-2:]
    H = G.float() + E
    Z = U.transpose(-1, -2) @ H
    return (Z * _probes(keys, a, b, G.device)).sum(-1)


def score_sketch(G, E, U, keys, k: int):
    b = G.shape[-1]
    H = G.float() + E
    return U.transpose(-1, -2) @ (H @ _probes(keys, b, k, G.device))


def project_residual(G, E, P, R, ok) -> None:
    H = G.float() + E
    Rn = P.transpose(-1, -2) @ H
    R.copy_(Rn)
    E.copy_(torch.where(ok, H - P @ Rn, E))


def decompress(P, Rbar, out) -> None:
    out.copy_(P @ Rbar)
