"""project_residual(G, E, P, R, ok) -> () (docs/OPS.md op 4).

H = G + E (formed on load, never stored); R[i] = P[i]^T H[i] rounded to
R.dtype (float32, or bfloat16 / float16 for a low-precision wire); if ``ok``
(0-dim bool read inside the kernel) E[i] = H[i] - P[i] R[i] with the rounded
R (the wire's rounding error stays in E), else E is left untouched.

Grid: (column block of b, matrix). Each program owns all a rows of a
BLOCK_N-wide column block, so the reduction over a and the residual write are
local (no atomics, deterministic):
* a fits one chunk (next_pow2(a) <= max_block_a): the H block stays in
  registers: G and E read once, R written once, E written once -- the
  roofline (2+4 read, 4 written bytes per element for bf16 G, plus R).
* larger a: pass 1 streams G, E in BLOCK_A row chunks accumulating
  R_block = P^T H_block in registers, pass 2 re-reads G, E chunk by chunk
  (the block was just read by this program, so mostly from L2) and writes
  E = H - P R_block. DRAM traffic between 1x and 2x reads of G and E,
  depending on L2 hits; see bench/KERNELS.md.
* r larger than max_block_r: R_block does not fit registers; R is computed
  in BLOCK_R row chunks (one pass over a each), stored to R, and the
  residual pass reads it back (tl.debug_barrier orders the CTA's own global
  stores before its loads). Only for r > max_block_r (default 128).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _project_residual_kernel(G, E, P, R, ok_ptr, a, b, r,
                             sGb, sGa, sGc, sEb, sEa, sEc, sPb, sPx, sPq,
                             sRb, sRq, sRc,
                             BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_R: tl.constexpr, ONE_A: tl.constexpr,
                             ONE_R: tl.constexpr, PREC: tl.constexpr, R_MODE: tl.constexpr):
    pn = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    rc = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mc = rc < b
    Gb = G + i * sGb
    Eb = E + i * sEb
    Pb = P + i * sPb
    Rb = R + i * sRb
    ok = tl.load(ok_ptr)
    if ONE_R:
        rq = tl.arange(0, BLOCK_R).to(tl.int64)
        mq = rq < r
        if ONE_A:
            # whole H block in registers: one read of G and E, one write of E
            rx = tl.arange(0, BLOCK_A).to(tl.int64)
            mx = rx < a
            mh = mx[:, None] & mc[None, :]
            g = tl.load(Gb + rx[:, None] * sGa + rc[None, :] * sGc, mask=mh, other=0.0)
            e = tl.load(Eb + rx[:, None] * sEa + rc[None, :] * sEc, mask=mh, other=0.0)
            h = g.to(tl.float32) + e
            pt = tl.load(Pb + rx[None, :] * sPx + rq[:, None] * sPq,
                         mask=mq[:, None] & mx[None, :], other=0.0)
            rsent = C.round_to(tl.dot(pt, h, input_precision=PREC), R_MODE)
            tl.store(Rb + rq[:, None] * sRq + rc[None, :] * sRc, rsent,
                     mask=mq[:, None] & mc[None, :])
            rblk = rsent.to(tl.float32)
            if ok:
                p = tl.load(Pb + rx[:, None] * sPx + rq[None, :] * sPq,
                            mask=mx[:, None] & mq[None, :], other=0.0)
                enew = h - tl.dot(p, rblk, input_precision=PREC)
                tl.store(Eb + rx[:, None] * sEa + rc[None, :] * sEc, enew, mask=mh)
        else:
            rblk = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            for x0 in range(0, a, BLOCK_A):
                rx = (x0 + tl.arange(0, BLOCK_A)).to(tl.int64)
                mx = rx < a
                mh = mx[:, None] & mc[None, :]
                g = tl.load(Gb + rx[:, None] * sGa + rc[None, :] * sGc, mask=mh, other=0.0)
                e = tl.load(Eb + rx[:, None] * sEa + rc[None, :] * sEc, mask=mh, other=0.0)
                h = g.to(tl.float32) + e
                pt = tl.load(Pb + rx[None, :] * sPx + rq[:, None] * sPq,
                             mask=mq[:, None] & mx[None, :], other=0.0)
                rblk = tl.dot(pt, h, rblk, input_precision=PREC)
            rsent = C.round_to(rblk, R_MODE)
            tl.store(Rb + rq[:, None] * sRq + rc[None, :] * sRc, rsent,
                     mask=mq[:, None] & mc[None, :])
            rblk = rsent.to(tl.float32)
            if ok:
                for x0 in range(0, a, BLOCK_A):
                    rx = (x0 + tl.arange(0, BLOCK_A)).to(tl.int64)
                    mx = rx < a
                    mh = mx[:, None] & mc[None, :]
                    g = tl.load(Gb + rx[:, None] * sGa + rc[None, :] * sGc, mask=mh, other=0.0)
                    e = tl.load(Eb + rx[:, None] * sEa + rc[None, :] * sEc, mask=mh, other=0.0)
                    h = g.to(tl.float32) + e
                    p = tl.load(Pb + rx[:, None] * sPx + rq[None, :] * sPq,
                                mask=mx[:, None] & mq[None, :], other=0.0)
                    enew = h - tl.dot(p, rblk, input_precision=PREC)
                    tl.store(Eb + rx[:, None] * sEa + rc[None, :] * sEc, enew, mask=mh)
    else:
        # r too large for registers: R chunk by chunk through memory
        for q0 in range(0, r, BLOCK_R):
            rq = (q0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mq = rq < r
            rblk = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            for x0 in range(0, a, BLOCK_A):
                rx = (x0 + tl.arange(0, BLOCK_A)).to(tl.int64)
                mx = rx < a
                mh = mx[:, None] & mc[None, :]
                g = tl.load(Gb + rx[:, None] * sGa + rc[None, :] * sGc, mask=mh, other=0.0)
                e = tl.load(Eb + rx[:, None] * sEa + rc[None, :] * sEc, mask=mh, other=0.0)
                h = g.to(tl.float32) + e
                pt = tl.load(Pb + rx[None, :] * sPx + rq[:, None] * sPq,
                             mask=mq[:, None] & mx[None, :], other=0.0)
                rblk = tl.dot(pt, h, rblk, input_precision=PREC)
            tl.store(Rb + rq[:, None] * sRq + rc[None, :] * sRc, C.round_to(rblk, R_MODE),
                     mask=mq[:, None] & mc[None, :])
        tl.debug_barrier()
        if ok:
            for x0 in range(0, a, BLOCK_A):
                rx = (x0 + tl.arange(0, BLOCK_A)).to(tl.int64)
                mx = rx < a
                mh = mx[:, None] & mc[None, :]
                g = tl.load(Gb + rx[:, None] * sGa + rc[None, :] * sGc, mask=mh, other=0.0)
                e = tl.load(Eb + rx[:, None] * sEa + rc[None, :] * sEc, mask=mh, other=0.0)
                acc = g.to(tl.float32) + e
                for q0 in range(0, r, BLOCK_R):
                    rq = (q0 + tl.arange(0, BLOCK_R)).to(tl.int64)
                    mq = rq < r
                    p = tl.load(Pb + rx[:, None] * sPx + rq[None, :] * sPq,
                                mask=mx[:, None] & mq[None, :], other=0.0)
                    rr = tl.load(Rb + rq[:, None] * sRq + rc[None, :] * sRc,
                                 mask=mq[:, None] & mc[None, :], other=0.0).to(tl.float32)
                    acc = acc - tl.dot(p, rr, input_precision=PREC)
                tl.store(Eb + rx[:, None] * sEa + rc[None, :] * sEc, acc, mask=mh)


def project_residual(G: torch.Tensor, E: torch.Tensor, P: torch.Tensor, R: torch.Tensor,
                     ok: torch.Tensor, *, precision: str | None = None,
                     block_n: int | None = None, block_a: int | None = None,
                     max_block_a: int = 128, max_block_r: int = 128,
                     num_warps: int = 4) -> None:
    C.check_tensor("G", G, 3, C.GRAD_DTYPES)
    C.check_tensor("E", E, 3, (torch.float32,))
    C.check_tensor("P", P, 3, (torch.float32,))
    C.check_tensor("R", R, 3, C.GRAD_DTYPES)
    C.check(isinstance(ok, torch.Tensor) and ok.dim() == 0 and ok.dtype == torch.bool,
            "ok must be a 0-dim bool tensor")
    C.same_device(G, E, P, R, ok)
    B, a, b = G.shape
    r = P.shape[2]
    C.check(tuple(E.shape) == (B, a, b), f"E shape {tuple(E.shape)} != G shape {tuple(G.shape)}")
    C.check(tuple(P.shape) == (B, a, r), f"P shape {tuple(P.shape)} != {(B, a, r)}")
    C.check(tuple(R.shape) == (B, r, b), f"R shape {tuple(R.shape)} != {(B, r, b)}")
    if B == 0 or b == 0:
        return
    if a == 0:
        return
    if r == 0:  # R is empty, E = H when ok (no host sync on ok)
        E.copy_(torch.where(ok, E + G.to(torch.float32), E))
        return
    C.check_batch(B)
    RP = max(16, C.next_pow2(r))
    one_r = RP <= max_block_r
    BR = RP if one_r else max(16, C.next_pow2(max_block_r))
    AP = max(16, C.next_pow2(a))
    one_a = block_a is None and AP <= max_block_a
    BA = AP if one_a else (block_a or min(AP, 64))
    BN = block_n or C.clamp_block(b, 16, 64 if (one_r and RP <= 64) else 32)
    with C.device_guard(G):
        _project_residual_kernel[(C.cdiv(b, BN), B)](
            G, E, P, R, ok, a, b, r,
            *G.stride(), *E.stride(), *P.stride(), *R.stride(),
            BLOCK_A=BA, BLOCK_N=BN, BLOCK_R=BR, ONE_A=one_a, ONE_R=one_r,
            PREC=C.precision(precision), R_MODE=C.ROUND_MODE[R.dtype], num_warps=num_warps)
