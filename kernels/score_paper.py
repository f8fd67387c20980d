"""score_paper(G, E, U, keys) -> lam (B, a) float32 (docs/OPS.md op 2).

lam[i, j] = sum_c (U[i]^T (G[i] + E[i]))[j, c] * randn(keys[i], j*b + c)

A GEMM-shaped kernel: program (j-block, column block, matrix) computes the
(BLOCK_J x BLOCK_N) tile of Z = U^T H with tl.dot over a (H = G + E formed
on load, never stored), multiplies it by the probes generated in registers
and reduces over the columns of the tile. The partial sums per column block
go to a small (B, n_col_blocks, a) buffer that is summed in a fixed order
(torch.sum over that dim): deterministic, no atomics.
Flops 2*a*a*b per matrix (the GEMM) plus a*b probes; traffic: U once per
column block, G and E once per j-block (L2-served: the j-blocks of one
column block are scheduled next to each other).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _score_paper_kernel(G, E, U, keys, part, a, b,
                        sGb, sGa, sGc, sEb, sEa, sEc, sUb, sUx, sUj, skb,
                        spb, sps,
                        BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    n_j = tl.cdiv(a, BLOCK_J)
    pj = pid % n_j  # j-blocks of the same column block run side by side
    pn = pid // n_j
    rj = (pj * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    rc = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mj = rj < a
    mc = rc < b
    Gb = G + i * sGb
    Eb = E + i * sEb
    Ub = U + i * sUb
    acc = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    for x0 in range(0, a, BLOCK_K):
        rx = (x0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mx = rx < a
        ut = tl.load(Ub + rx[None, :] * sUx + rj[:, None] * sUj,
                     mask=mj[:, None] & mx[None, :], other=0.0)
        mh = mx[:, None] & mc[None, :]
        g = tl.load(Gb + rx[:, None] * sGa + rc[None, :] * sGc, mask=mh, other=0.0)
        e = tl.load(Eb + rx[:, None] * sEa + rc[None, :] * sEc, mask=mh, other=0.0)
        h = g.to(tl.float32) + e
        acc = tl.dot(ut, h, acc, input_precision=PREC)
    key = tl.load(keys + i * skb)
    v = tl.randn(key, rj[:, None] * b + rc[None, :])
    z = tl.where(mj[:, None] & mc[None, :], acc * v, 0.0)
    s = tl.sum(z, axis=1)
    tl.store(part + i * spb + pn * sps + rj, s, mask=mj)


def score_paper(G: torch.Tensor, E: torch.Tensor, U: torch.Tensor, keys: torch.Tensor,
                *, precision: str | None = None, block_j: int | None = None,
                block_k: int | None = None, block_n: int | None = None,
                num_warps: int = 8) -> torch.Tensor:
    C.check_tensor("G", G, 3, C.GRAD_DTYPES)
    C.check_tensor("E", E, 3, (torch.float32,))
    C.check_tensor("U", U, 3, (torch.float32,))
    C.check_tensor("keys", keys, 1, (torch.int64,))
    C.same_device(G, E, U, keys)
    B, a, b = G.shape
    C.check(tuple(E.shape) == (B, a, b), f"E shape {tuple(E.shape)} != G shape {tuple(G.shape)}")
    C.check(tuple(U.shape) == (B, a, a), f"U shape {tuple(U.shape)} != {(B, a, a)}")
    C.check(tuple(keys.shape) == (B,), f"keys shape {tuple(keys.shape)} != {(B,)}")
    if B == 0 or a == 0:
        return torch.zeros((B, a), dtype=torch.float32, device=G.device)
    if b == 0:
        return torch.zeros((B, a), dtype=torch.float32, device=G.device)
    C.check_batch(B)
    BJ = block_j or C.clamp_block(a, 16, 32)  # 64 spills on sm_100 with 16-bit G (bench/kernels_static.py)
    BK = block_k or 16
    # 64 columns spill 16 B with 16-bit G on sm_100 under Triton 3.6 (bench/kernels_static.py)
    BN = block_n or C.clamp_block(b, 16, 64 if G.element_size() == 4 else 32)
    n_j, n_n = C.cdiv(a, BJ), C.cdiv(b, BN)
    part = torch.empty((B, n_n, a), dtype=torch.float32, device=G.device)
    with C.device_guard(G):
        _score_paper_kernel[(n_j * n_n, B)](
            G, E, U, keys, part, a, b,
            *G.stride(), *E.stride(), *U.stride(), keys.stride(0),
            part.stride(0), part.stride(1),
            BLOCK_J=BJ, BLOCK_K=BK, BLOCK_N=BN, PREC=C.precision(precision),
            num_warps=num_warps)
    # fixed-order reduction over the column blocks: deterministic
    return part[:, 0].clone() if n_n == 1 else part.sum(dim=1)
