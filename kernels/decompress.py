"""decompress(P, Rbar, out) -> () (docs/OPS.md op 5).

out[i] = P[i] @ Rbar[i] rounded to out.dtype, written straight into ``out``
(Rbar float32, or bfloat16 / float16 as a low-precision wire delivers it)
(typically a strided, transposed view of the gradient bucket).
Grid: (row block x column block, matrix); each program loops over r in
BLOCK_R chunks with tl.dot, accumulating in float32, and stores once.
Traffic: reads P (a*r*4, once per column block, L2-served) and Rbar (r*b*4,
once per row block), writes out once (a*b*out.element_size()).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _decompress_kernel(P, Rb, out, a, b, r,
                       sPb, sPx, sPq, sRb, sRq, sRc, sOb, sOx, sOc,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, PREC: tl.constexpr,
                       OUT_MODE: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    n_m = tl.cdiv(a, BLOCK_M)
    pm = pid % n_m
    pn = pid // n_m
    rm = (pm * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rc = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mm = rm < a
    mc = rc < b
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, r, BLOCK_R):
        rq = (q0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mq = rq < r
        p = tl.load(P + i * sPb + rm[:, None] * sPx + rq[None, :] * sPq,
                    mask=mm[:, None] & mq[None, :], other=0.0)
        rr = tl.load(Rb + i * sRb + rq[:, None] * sRq + rc[None, :] * sRc,
                     mask=mq[:, None] & mc[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(p, rr, acc, input_precision=PREC)
    val = C.round_to(acc, OUT_MODE)
    tl.store(out + i * sOb + rm[:, None] * sOx + rc[None, :] * sOc, val,
             mask=mm[:, None] & mc[None, :])


def decompress(P: torch.Tensor, Rbar: torch.Tensor, out: torch.Tensor, *,
               precision: str | None = None, block_m: int | None = None,
               block_n: int | None = None, block_r: int | None = None,
               num_warps: int = 8) -> None:
    C.check_tensor("P", P, 3, (torch.float32,))
    C.check_tensor("Rbar", Rbar, 3, C.GRAD_DTYPES)
    C.check_tensor("out", out, 3, C.GRAD_DTYPES)
    C.same_device(P, Rbar, out)
    B, a, r = P.shape
    C.check(Rbar.shape[0] == B and Rbar.shape[1] == r,
            f"Rbar shape {tuple(Rbar.shape)} does not match P {tuple(P.shape)}")
    b = Rbar.shape[2]
    C.check(tuple(out.shape) == (B, a, b), f"out shape {tuple(out.shape)} != {(B, a, b)}")
    if B == 0 or a == 0 or b == 0:
        return
    if r == 0:
        out.zero_()
        return
    C.check_batch(B)
    BM = block_m or C.clamp_block(a, 16, 64)
    BN = block_n or C.clamp_block(b, 16, 64)
    BR = block_r or 16
    grid = (C.cdiv(a, BM) * C.cdiv(b, BN), B)
    with C.device_guard(out):
        _decompress_kernel[grid](
            P, Rbar, out, a, b, r, *P.stride(), *Rbar.stride(), *out.stride(),
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR, PREC=C.precision(precision),
            OUT_MODE=C.ROUND_MODE[out.dtype], num_warps=num_warps)
