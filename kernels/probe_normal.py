"""probe_normal(keys, rows, cols) -> (B, rows, cols) float32 (docs/OPS.md op 1).

out[i, x, y] = tl.randn(keys[i], x*cols + y). A utility op for tests and
references; the score kernels generate the same numbers in-register.
Traffic: writes 4*B*rows*cols bytes, reads nothing but the keys.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _probe_normal_kernel(keys_ptr, out_ptr, n, stride_kb, stride_ob,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    key = tl.load(keys_ptr + i * stride_kb)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    v = tl.randn(key, offs)
    tl.store(out_ptr + i * stride_ob + offs, v, mask=offs < n)


def probe_normal(keys: torch.Tensor, rows: int, cols: int, *, block: int | None = None) -> torch.Tensor:
    C.check_tensor("keys", keys, 1, (torch.int64,))
    rows, cols = int(rows), int(cols)
    C.check(rows >= 0 and cols >= 0, "rows and cols must be >= 0")
    B = keys.shape[0]
    out = torch.empty((B, rows, cols), dtype=torch.float32, device=keys.device)
    n = rows * cols
    if B == 0 or n == 0:
        return out
    C.check_batch(B)
    BLOCK = block or C.clamp_block(n, 16, 1024)
    with C.device_guard(keys):
        _probe_normal_kernel[(C.cdiv(n, BLOCK), B)](
            keys, out, n, keys.stride(0), out.stride(0), BLOCK=BLOCK)
    return out
