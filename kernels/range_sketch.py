"""range_sketch(G, E, Q) -> Y (B, a, c) float32 (docs/OPS.md op 4).

Y[i] = (G[i] + E[i]) @ Q[i]^T with Q (B, c, b): Lore's sketch of the range of H.

Grid: (row block of a x split of the columns, matrix). Each program streams its
rows of G and E once over its share of the columns, forms H on load and
accumulates H_blk Q_blk^T with tl.dot (c padded to >= 16 with zero rows of Q).
Every element of G and E is read exactly once; Q (c x b, small) is read once
per row block. Partials Y_s (B, split, a, CP) are summed over the splits in a
fixed order afterwards (deterministic). Traffic: G and E once, Q a/BLOCK_M
times (L2), partials 2 * split * a * CP * 4 bytes. Flops: 2 * a * b * CP.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _range_sketch_kernel(G, E, Q, Y, a, b, c, cols_per_split,
                         sGb, sGa, sGc, sEb, sEa, sEc, sQb, sQq, sQc, sYb, sYs, sYx,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CP: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    n_m = tl.cdiv(a, BLOCK_M)
    pm = pid % n_m
    ps = pid // n_m
    rm = (pm * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rq = tl.arange(0, CP).to(tl.int64)
    mm = rm < a
    mq = rq < c
    Gb = G + i * sGb + rm[:, None] * sGa
    Eb = E + i * sEb + rm[:, None] * sEa
    Qb = Q + i * sQb + rq[None, :] * sQq
    c_start = ps * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, b)
    acc = tl.zeros((BLOCK_M, CP), dtype=tl.float32)
    for c0 in range(c_start, c_end, BLOCK_N):
        rc = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mc = rc < c_end
        mh = mm[:, None] & mc[None, :]
        g = tl.load(Gb + rc[None, :] * sGc, mask=mh, other=0.0)
        e = tl.load(Eb + rc[None, :] * sEc, mask=mh, other=0.0)
        h = g.to(tl.float32) + e
        q = tl.load(Qb + rc[:, None] * sQc, mask=mc[:, None] & mq[None, :], other=0.0)
        acc = tl.dot(h, q, acc, input_precision=PREC)
    tl.store(Y + i * sYb + ps * sYs + rm[:, None] * sYx + rq[None, :], acc, mask=mm[:, None])


def range_sketch(G: torch.Tensor, E: torch.Tensor, Q: torch.Tensor, *, precision: str | None = None,
                 split: int | None = None, block_m: int | None = None, block_n: int | None = None,
                 num_warps: int = 8) -> torch.Tensor:
    C.check_tensor("G", G, 3, C.GRAD_DTYPES)
    C.check_tensor("E", E, 3, (torch.float32,))
    C.check_tensor("Q", Q, 3, (torch.float32,))
    C.same_device(G, E, Q)
    B, a, b = G.shape
    c = Q.shape[1]
    C.check(tuple(E.shape) == (B, a, b), f"E shape {tuple(E.shape)} != G shape {tuple(G.shape)}")
    C.check(Q.shape[0] == B and Q.shape[2] == b, f"Q shape {tuple(Q.shape)} != {(B, c, b)}")
    if B == 0 or a == 0 or c == 0 or b == 0:
        return torch.zeros((B, a, c), dtype=torch.float32, device=G.device)
    C.check_batch(B)
    CP = max(16, C.next_pow2(c))
    BM = block_m or C.clamp_block(a, 16, 64 if CP <= 64 else 32)
    BN = block_n or C.clamp_block(b, 16, 64)
    n_m, n_cb = C.cdiv(a, BM), C.cdiv(b, BN)
    if split is None:
        # enough programs to fill the device (4 per SM), never more than the column blocks
        split = max(1, min(n_cb, C.cdiv(4 * C.num_sms(G), B * n_m)))
    split = max(1, min(int(split), n_cb))
    cols_per_split = C.cdiv(n_cb, split) * BN
    split = C.cdiv(b, cols_per_split)
    Ys = torch.empty((B, split, a, CP), dtype=torch.float32, device=G.device)
    with C.device_guard(G):
        _range_sketch_kernel[(n_m * split, B)](
            G, E, Q, Ys, a, b, c, cols_per_split,
            *G.stride(), *E.stride(), *Q.stride(), Ys.stride(0), Ys.stride(1), Ys.stride(2),
            BLOCK_M=BM, BLOCK_N=BN, CP=CP, PREC=C.precision(precision), num_warps=num_warps)
    out = Ys[:, 0, :, :c].clone()
    for s in range(1, split):  # fixed order: deterministic
        out += Ys[:, s, :, :c]
    return out
