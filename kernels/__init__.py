"""Triton kernels: the CUDA implementations of ``torch.ops.lorecomm.*``.

Installed as ``lorecomm.kernels``; one op per module (docs/OPS.md):
``probe_normal``, ``score_paper``, ``score_sketch``, ``range_sketch``,
``project_residual``, ``decompress``. The launchers take CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1`` is set before triton is imported (tests, bench --quick).

``register_cuda_kernels()`` makes them the CUDA kernels of the ops declared in
C++ (``lorecomm._C``); it warns and does nothing if the ops are not declared.
"""
from __future__ import annotations

import warnings

import torch

from .decompress import decompress
from .probe_normal import probe_normal
from .project_residual import project_residual
from .range_sketch import range_sketch
from .score_paper import score_paper
from .score_sketch import score_sketch

__all__ = ["probe_normal", "score_paper", "score_sketch", "range_sketch", "project_residual",
           "decompress", "LAUNCHERS", "register_cuda_kernels", "ops_declared"]

LAUNCHERS = {
    "probe_normal": probe_normal,
    "score_paper": score_paper,
    "score_sketch": score_sketch,
    "range_sketch": range_sketch,
    "project_residual": project_residual,
    "decompress": decompress,
}


# Exact op signatures (no keyword-only tuning arguments), as the dispatcher calls them.
def _cuda_probe_normal(keys, rows, cols):
    return probe_normal(keys, rows, cols)


def _cuda_score_paper(G, E, U, keys):
    return score_paper(G, E, U, keys)


def _cuda_score_sketch(G, E, U, keys, k):
    return score_sketch(G, E, U, keys, k)


def _cuda_range_sketch(G, E, Q):
    return range_sketch(G, E, Q)


def _cuda_project_residual(G, E, P, R, ok):
    project_residual(G, E, P, R, ok)


def _cuda_decompress(P, Rbar, out):
    decompress(P, Rbar, out)


_CUDA_IMPLS = {
    "probe_normal": _cuda_probe_normal,
    "score_paper": _cuda_score_paper,
    "score_sketch": _cuda_score_sketch,
    "range_sketch": _cuda_range_sketch,
    "project_residual": _cuda_project_residual,
    "decompress": _cuda_decompress,
}

_handles: dict = {}


def _op_declared(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"lorecomm::{name}", "")
        return True
    except RuntimeError:
        return False


def ops_declared() -> list[str]:
    """Names of the lorecomm ops the dispatcher knows (after importing lorecomm._C)."""
    try:
        import lorecomm._C  # noqa: F401  (declares the ops)
    except ImportError:
        pass
    return [n for n in _CUDA_IMPLS if _op_declared(n)]


def register_cuda_kernels() -> list[str]:
    """Register every launcher as the CUDA kernel of ``torch.ops.lorecomm.<op>``.

    Idempotent. Returns the names registered. Ops that are not declared are
    skipped with a warning (the C++ library is not built or not importable).
    """
    declared = set(ops_declared())
    missing = [n for n in _CUDA_IMPLS if n not in declared]
    if missing:
        warnings.warn(f"lorecomm.kernels: ops not declared, CUDA kernels not registered: {missing}"
                      " (is lorecomm._C built?)", RuntimeWarning, stacklevel=2)
    done = []
    for name, fn in _CUDA_IMPLS.items():
        if name in missing:
            continue
        if name not in _handles:
            _handles[name] = torch.library.register_kernel(f"lorecomm::{name}", "cuda", fn)
        done.append(name)
    return done
