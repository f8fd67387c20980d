"""Shared launcher helpers and device functions for the Triton kernels (no kernels in here).

Every launcher works on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU
tensors (the Triton interpreter), which is how the tests run them without a GPU.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Precision of tl.dot on float32 operands. "ieee" keeps the float32 contract of
# docs/OPS.md (all maths in float32); "tf32x3" is near-fp32 on tensor cores and
# "tf32" is the fast GEMM setting (10-bit mantissa inputs). The interpreter
# ignores it (numpy float32 matmul). Default "ieee"; the environment variable
# LORECOMM_DOT_PRECISION overrides it process-wide (read at import).
DEFAULT_PRECISION = os.environ.get("LORECOMM_DOT_PRECISION", "ieee")
PRECISIONS = ("ieee", "tf32", "tf32x3")

# CUDA caps grid dims 1 and 2 at 65535: the batch goes on axis 1.
MAX_GRID_Y = 65535


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def clamp_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(n)))


def cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


def precision(p: str | None) -> str:
    p = DEFAULT_PRECISION if p is None else p
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")
    return p


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_batch(B: int) -> None:
    check(B <= MAX_GRID_Y, f"batch {B} exceeds the CUDA grid limit {MAX_GRID_Y}")


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a tensor")
    check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    check(t.dtype in dtypes, f"{name} dtype {t.dtype} not in {dtypes}")


def same_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    for t in ts[1:]:
        check(t.device == dev, f"all tensors must be on {dev}, got {t.device}")


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def num_sms(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return 1


#: dtype -> MODE of ``round_to`` (and the kernels' OUT_MODE / R_MODE constexprs)
ROUND_MODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def round_to(x, MODE: tl.constexpr):
    """float32 x rounded to nearest even in MODE's dtype (0 fp32, 1 bf16, 2 fp16).

    bf16 by hand on the bits: the GPU's cvt.rn.bf16 gives the same bits, the
    interpreter's cast does not; NaN stays NaN.
    """
    if MODE == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        v = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), v)
    elif MODE == 2:
        return x.to(tl.float16)
    else:
        return x
