"""score_sketch(G, E, U, keys, k) -> lam (B, a, k) float32 (docs/OPS.md op 3).

lam[i] = U[i]^T ((G[i] + E[i]) S_i),  S_i[c, q] = randn(keys[i], c*k + q).

Two stages (one op):
1. ``_sketch_hs_kernel``: program (row block of a, split of the columns,
   matrix) streams its rows of G and E once, forms H on load and
   accumulates Y = H S with tl.dot against the probe block generated in
   registers (k padded to >= 16 with zero probes). Every element of G and E
   is read exactly once; S never exists in memory. Partials
   Y_s (B, split, a, KP) are written (tiny: a*KP*4 bytes per split).
2. ``_sketch_ut_kernel``: lam = U^T (sum_s Y_s), summing the splits in a
   fixed order (deterministic) and reading U once.
Traffic: G and E once, U once, plus 2*split*a*KP*4 bytes of partials.
Flops: 2*a*b*KP (H S) + 2*a*a*KP (U^T Y), probes a_blocks*b*k.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _sketch_hs_kernel(G, E, keys, Y, a, b, k, cols_per_split,
                      sGb, sGa, sGc, sEb, sEa, sEc, skb, sYb, sYs, sYx,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      KP: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    n_m = tl.cdiv(a, BLOCK_M)
    pm = pid % n_m
    ps = pid // n_m
    rm = (pm * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rq = tl.arange(0, KP).to(tl.int64)
    mm = rm < a
    mq = rq < k
    key = tl.load(keys + i * skb)
    Gb = G + i * sGb + rm[:, None] * sGa
    Eb = E + i * sEb + rm[:, None] * sEa
    c_start = ps * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, b)
    acc = tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    for c0 in range(c_start, c_end, BLOCK_N):
        rc = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mc = rc < c_end
        mh = mm[:, None] & mc[None, :]
        g = tl.load(Gb + rc[None, :] * sGc, mask=mh, other=0.0)
        e = tl.load(Eb + rc[None, :] * sEc, mask=mh, other=0.0)
        h = g.to(tl.float32) + e
        s = tl.randn(key, rc[:, None] * k + rq[None, :])
        s = tl.where(mc[:, None] & mq[None, :], s, 0.0)
        acc = tl.dot(h, s, acc, input_precision=PREC)
    tl.store(Y + i * sYb + ps * sYs + rm[:, None] * sYx + rq[None, :], acc,
             mask=mm[:, None])


@triton.jit
def _sketch_ut_kernel(U, Y, lam, a, k, n_split,
                      sUb, sUx, sUj, sYb, sYs, sYx, sLb, sLj,
                      BLOCK_J: tl.constexpr, BLOCK_X: tl.constexpr,
                      KP: tl.constexpr, PREC: tl.constexpr):
    pj = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    rj = (pj * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    rq = tl.arange(0, KP).to(tl.int64)
    mj = rj < a
    acc = tl.zeros((BLOCK_J, KP), dtype=tl.float32)
    for x0 in range(0, a, BLOCK_X):
        rx = (x0 + tl.arange(0, BLOCK_X)).to(tl.int64)
        mx = rx < a
        y = tl.zeros((BLOCK_X, KP), dtype=tl.float32)
        for s in range(0, n_split):  # fixed order: deterministic
            y += tl.load(Y + i * sYb + s * sYs + rx[:, None] * sYx + rq[None, :],
                         mask=mx[:, None], other=0.0)
        ut = tl.load(U + i * sUb + rx[None, :] * sUx + rj[:, None] * sUj,
                     mask=mj[:, None] & mx[None, :], other=0.0)
        acc = tl.dot(ut, y, acc, input_precision=PREC)
    tl.store(lam + i * sLb + rj[:, None] * sLj + rq[None, :], acc,
             mask=mj[:, None] & (rq[None, :] < k))


def score_sketch(G: torch.Tensor, E: torch.Tensor, U: torch.Tensor, keys: torch.Tensor,
                 k: int, *, precision: str | None = None, split: int | None = None,
                 block_m: int | None = None, block_n: int | None = None,
                 block_j: int | None = None, block_x: int | None = None,
                 num_warps: int = 8) -> torch.Tensor:
    C.check_tensor("G", G, 3, C.GRAD_DTYPES)
    C.check_tensor("E", E, 3, (torch.float32,))
    C.check_tensor("U", U, 3, (torch.float32,))
    C.check_tensor("keys", keys, 1, (torch.int64,))
    C.same_device(G, E, U, keys)
    k = int(k)
    C.check(k >= 1, f"k must be >= 1, got {k}")
    B, a, b = G.shape
    C.check(tuple(E.shape) == (B, a, b), f"E shape {tuple(E.shape)} != G shape {tuple(G.shape)}")
    C.check(tuple(U.shape) == (B, a, a), f"U shape {tuple(U.shape)} != {(B, a, a)}")
    C.check(tuple(keys.shape) == (B,), f"keys shape {tuple(keys.shape)} != {(B,)}")
    lam = torch.zeros((B, a, k), dtype=torch.float32, device=G.device)
    if B == 0 or a == 0 or b == 0:
        return lam
    C.check_batch(B)
    prec = C.precision(precision)
    KP = max(16, C.next_pow2(k))
    BM = block_m or C.clamp_block(a, 16, 64)
    BN = block_n or C.clamp_block(b, 16, 64 if G.element_size() < 4 else 32)  # fp32 G at 64 spills
    n_m, n_cb = C.cdiv(a, BM), C.cdiv(b, BN)
    if split is None:
        # enough programs to fill the device (4 per SM), never more than the column blocks
        split = max(1, min(n_cb, C.cdiv(4 * C.num_sms(G), B * n_m)))
    split = max(1, min(int(split), n_cb))
    cols_per_split = C.cdiv(n_cb, split) * BN
    split = C.cdiv(b, cols_per_split)
    Y = torch.empty((B, split, a, KP), dtype=torch.float32, device=G.device)
    BJ = block_j or C.clamp_block(a, 16, 64)
    BX = block_x or C.clamp_block(a, 16, 64)
    with C.device_guard(G):
        _sketch_hs_kernel[(n_m * split, B)](
            G, E, keys, Y, a, b, k, cols_per_split,
            *G.stride(), *E.stride(), keys.stride(0),
            Y.stride(0), Y.stride(1), Y.stride(2),
            BLOCK_M=BM, BLOCK_N=BN, KP=KP, PREC=prec, num_warps=num_warps)
        _sketch_ut_kernel[(C.cdiv(a, BJ), B)](
            U, Y, lam, a, k, split, *U.stride(),
            Y.stride(0), Y.stride(1), Y.stride(2), lam.stride(0), lam.stride(1),
            BLOCK_J=BJ, BLOCK_X=BX, KP=KP, PREC=prec, num_warps=num_warps)
    return lam
