"""project_residual(G, E, P, R, ok) -> () (docs/OPS.md op 4).

H = G + E (formed on load, never stored); R[i] = P[i]^T H[i] rounded to
R.dtype (float32, or bfloat16 / float16 for a low-precision wire); if ``ok``
(0-dim bool read inside the kernel) E[i] = H[i] - P[i] R[i] with the rounded
R (the wire's rounding error stays in E), else E is left untouched.

Two paths, no atomics, deterministic:
* a and r small (next_pow2(a) <= max_block_a, default 128, and
  next_pow2(a) * max(16, next_pow2(r)) <= 4096): one kernel, grid (column
  block of b, matrix). Each program holds the a x BLOCK_N block
  of H in registers: G and E read once, R and E written once -- the roofline.
* larger a: the reduction over a is split so that the grid fills the device
  (a program per column block could not: one 4096 x 4096 matrix would launch
  b / BLOCK_N = 64-128 programs on 132 SMs). ``_project_partial_kernel``,
  grid (chunk of r x column block x split of a, matrix), writes partial
  products P_s^T H_s (B, split, r, b) float32; they are summed in a fixed
  order and rounded into R (torch: round to nearest even, as the kernels
  round); ``_residual_kernel``, grid (row block x column block, matrix),
  re-reads G and E and writes E = H - P R (R as rounded). Traffic: G and E
  read twice, E written once, partials 2 * split * r * b * 4 bytes: about
  n * (2g + 12) bytes against the n * (g + 8) minimum (bench/KERNELS.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _project_residual_kernel(G, E, P, R, ok_ptr, a, b, r,
                             sGb, sGa, sGc, sEb, sEa, sEc, sPb, sPx, sPq, sRb, sRq, sRc,
                             BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                             PREC: tl.constexpr, R_MODE: tl.constexpr):
    """a <= BLOCK_A, r <= BLOCK_R: the whole a x BLOCK_N block of H in registers."""
    pn = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    rc = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rx = tl.arange(0, BLOCK_A).to(tl.int64)
    rq = tl.arange(0, BLOCK_R).to(tl.int64)
    mc = rc < b
    mx = rx < a
    mq = rq < r
    mh = mx[:, None] & mc[None, :]
    g = tl.load(G + i * sGb + rx[:, None] * sGa + rc[None, :] * sGc, mask=mh, other=0.0)
    e = tl.load(E + i * sEb + rx[:, None] * sEa + rc[None, :] * sEc, mask=mh, other=0.0)
    h = g.to(tl.float32) + e
    pt = tl.load(P + i * sPb + rx[None, :] * sPx + rq[:, None] * sPq, mask=mq[:, None] & mx[None, :], other=0.0)
    rsent = C.round_to(tl.dot(pt, h, input_precision=PREC), R_MODE)
    tl.store(R + i * sRb + rq[:, None] * sRq + rc[None, :] * sRc, rsent, mask=mq[:, None] & mc[None, :])
    if tl.load(ok_ptr):
        p = tl.load(P + i * sPb + rx[:, None] * sPx + rq[None, :] * sPq, mask=mx[:, None] & mq[None, :], other=0.0)
        enew = h - tl.dot(p, rsent.to(tl.float32), input_precision=PREC)
        tl.store(E + i * sEb + rx[:, None] * sEa + rc[None, :] * sEc, enew, mask=mh)


@triton.jit
def _project_partial_kernel(G, E, P, Rp, a, b, r, rows_per_split, n_split,
                            sGb, sGa, sGc, sEb, sEa, sEc, sPb, sPx, sPq, sRb, sRs, sRq,
                            BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                            PREC: tl.constexpr):
    """Rp[i, s, q-chunk, column block] = P[i, rows s, q-chunk]^T H[i, rows s, column block]."""
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    n_n = tl.cdiv(b, BLOCK_N)
    n_q = tl.cdiv(r, BLOCK_R)
    pq = pid % n_q  # the r chunks of one H tile are adjacent in the launch: the re-read hits L2
    pn = (pid // n_q) % n_n
    ps = pid // (n_q * n_n)
    rc = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rq = (pq * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mc = rc < b
    mq = rq < r
    x_start = ps * rows_per_split
    x_end = tl.minimum(x_start + rows_per_split, a)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for x0 in range(x_start, x_end, BLOCK_A):
        rx = (x0 + tl.arange(0, BLOCK_A)).to(tl.int64)
        mx = rx < x_end
        mh = mx[:, None] & mc[None, :]
        g = tl.load(G + i * sGb + rx[:, None] * sGa + rc[None, :] * sGc, mask=mh, other=0.0)
        e = tl.load(E + i * sEb + rx[:, None] * sEa + rc[None, :] * sEc, mask=mh, other=0.0)
        pt = tl.load(P + i * sPb + rx[None, :] * sPx + rq[:, None] * sPq, mask=mq[:, None] & mx[None, :], other=0.0)
        acc = tl.dot(pt, g.to(tl.float32) + e, acc, input_precision=PREC)
    tl.store(Rp + i * sRb + ps * sRs + rq[:, None] * sRq + rc[None, :], acc, mask=mq[:, None] & mc[None, :])


@triton.jit
def _residual_kernel(G, E, P, R, ok_ptr, a, b, r,
                     sGb, sGa, sGc, sEb, sEa, sEc, sPb, sPx, sPq, sRb, sRq, sRc,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                     PREC: tl.constexpr):
    """E = G + E - P R on one BLOCK_M x BLOCK_N tile (R as rounded for the wire); nothing when not ok."""
    if tl.load(ok_ptr):
        pid = tl.program_id(0)
        i = tl.program_id(1).to(tl.int64)
        n_m = tl.cdiv(a, BLOCK_M)
        rm = ((pid % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rc = ((pid // n_m) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mm = rm < a
        mc = rc < b
        mh = mm[:, None] & mc[None, :]
        g = tl.load(G + i * sGb + rm[:, None] * sGa + rc[None, :] * sGc, mask=mh, other=0.0)
        e = tl.load(E + i * sEb + rm[:, None] * sEa + rc[None, :] * sEc, mask=mh, other=0.0)
        pr = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for q0 in range(0, r, BLOCK_R):
            rq = (q0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mq = rq < r
            p = tl.load(P + i * sPb + rm[:, None] * sPx + rq[None, :] * sPq, mask=mm[:, None] & mq[None, :], other=0.0)
            rr = tl.load(R + i * sRb + rq[:, None] * sRq + rc[None, :] * sRc, mask=mq[:, None] & mc[None, :],
                         other=0.0)
            pr = tl.dot(p, rr.to(tl.float32), pr, input_precision=PREC)
        tl.store(E + i * sEb + rm[:, None] * sEa + rc[None, :] * sEc, g.to(tl.float32) + e - pr, mask=mh)


def project_residual(G: torch.Tensor, E: torch.Tensor, P: torch.Tensor, R: torch.Tensor,
                     ok: torch.Tensor, *, precision: str | None = None, max_block_a: int = 128,
                     split: int | None = None, block_n: int | None = None, block_a: int | None = None,
                     block_r: int | None = None, num_warps: int | None = None) -> None:
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
    if B == 0 or b == 0 or a == 0:
        return
    if r == 0:  # R is empty, E = H when ok (no host sync on ok)
        E.copy_(torch.where(ok, E + G.to(torch.float32), E))
        return
    C.check_batch(B)
    prec = C.precision(precision)
    RP = max(16, C.next_pow2(r))
    AP = max(16, C.next_pow2(a))
    if AP <= max_block_a and AP * RP <= 128 * 32:
        # fused; the block sizes keep every such (a, r) spill-free on sm_90 (bench/kernels_static.py)
        BN = block_n or C.clamp_block(b, 16, 16)
        with C.device_guard(G):
            _project_residual_kernel[(C.cdiv(b, BN), B)](
                G, E, P, R, ok, a, b, r, *G.stride(), *E.stride(), *P.stride(), *R.stride(),
                BLOCK_A=AP, BLOCK_N=BN, BLOCK_R=RP, PREC=prec, R_MODE=C.ROUND_MODE[R.dtype],
                num_warps=num_warps or 8)
        return
    # split-a path: partial products, fixed-order sum, rounding, residual
    BN = block_n or C.clamp_block(b, 16, 32)
    # 32 x 32 x 32 tiles with 8 warps are spill-free with ieee dots for every G dtype (wider r chunks spill);
    # larger r runs several chunks, adjacent in the launch so the re-reads of an H tile hit L2
    BR = block_r or min(RP, 32)
    BA = block_a or 32
    n_n, n_q, n_a = C.cdiv(b, BN), C.cdiv(r, BR), C.cdiv(a, BA)
    if split is None:
        # enough programs to fill the device (4 per SM), never fewer than 4 row chunks a split
        split = max(1, min(C.cdiv(n_a, 4), C.cdiv(4 * C.num_sms(G), B * n_n * n_q)))
    split = max(1, min(int(split), n_a))
    rows_per_split = C.cdiv(n_a, split) * BA
    split = C.cdiv(a, rows_per_split)
    Rp = torch.empty((B, split, r, b), dtype=torch.float32, device=G.device)
    # residual tiles: 32 x 32 x 16 with 4 warps is spill-free with a bf16 R (3-5 CTAs per SM on sm_90)
    BM2, BN2, BR2 = C.clamp_block(a, 16, 32), C.clamp_block(b, 16, 32), 16
    with C.device_guard(G):
        _project_partial_kernel[(n_n * split * n_q, B)](
            G, E, P, Rp, a, b, r, rows_per_split, split,
            *G.stride(), *E.stride(), *P.stride(), Rp.stride(0), Rp.stride(1), Rp.stride(2),
            BLOCK_A=BA, BLOCK_N=BN, BLOCK_R=BR, PREC=prec, num_warps=num_warps or 8)
        Rsum = Rp[:, 0]
        for s in range(1, split):  # fixed order: deterministic
            Rsum = Rsum + Rp[:, s]
        R.copy_(Rsum)  # round to nearest even (NaN kept), as round_to
        _residual_kernel[(C.cdiv(a, BM2) * C.cdiv(b, BN2), B)](
            G, E, P, R, ok, a, b, r, *G.stride(), *E.stride(), *P.stride(), *R.stride(),
            BLOCK_M=BM2, BLOCK_N=BN2, BLOCK_R=BR2, PREC=prec, num_warps=num_warps or 4)
