"""The runtime's entry to the compressed-step ops: thin wrappers over the
compiled ``torch.ops.lorecomm`` library (contract: docs/OPS.md).

The ops are declared in C++ (``csrc/ops.cpp``, loaded with ``lorecomm._C``)
with C++ CPU kernels; their CUDA kernels are the Triton launchers of
``lorecomm.kernels`` (registered here on CUDA builds of torch, when
importable); their fake (meta) kernels are registered below so the ops trace
under FakeTensor / ``torch.compile`` and pass ``torch.library.opcheck``.

Shapes: G, E (B, a, b); U (B, a, a); P (B, a, r); R, Rbar (B, r, b);
keys (B,) int64; ok 0-dim bool.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.lorecomm.*)
except ImportError as exc:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "lorecomm._C (the compiled op library) is not built or does not match this torch "
        f"({torch.__version__}): {exc}.\nBuild it from the repository root with\n"
        "    pip install --no-build-isolation -c requirements/constraints-cpu.txt -e .\n"
        "(needs cmake>=3.18 and a C++20 compiler; the CPU build needs no CUDA)."
    ) from exc

__all__ = ["probe_normal", "probe_keys", "score_paper", "score_sketch", "range_sketch", "project_residual",
           "decompress", "refresh_basis", "BACKEND"]

_ops = torch.ops.lorecomm


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("lorecomm::probe_normal")
def _probe_normal_fake(keys, rows, cols):
    return keys.new_empty((keys.shape[0], rows, cols), dtype=torch.float32)


@torch.library.register_fake("lorecomm::score_paper")
def _score_paper_fake(G, E, U, keys):
    torch._check(G.dim() == 3, lambda: "score_paper: G must be 3-D")
    return G.new_empty((G.shape[0], G.shape[1]), dtype=torch.float32)


@torch.library.register_fake("lorecomm::score_sketch")
def _score_sketch_fake(G, E, U, keys, k):
    torch._check(G.dim() == 3, lambda: "score_sketch: G must be 3-D")
    return G.new_empty((G.shape[0], G.shape[1], k), dtype=torch.float32)


@torch.library.register_fake("lorecomm::range_sketch")
def _range_sketch_fake(G, E, Q):
    torch._check(G.dim() == 3 and Q.dim() == 3, lambda: "range_sketch: G and Q must be 3-D")
    return G.new_empty((G.shape[0], G.shape[1], Q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("lorecomm::probe_keys")
def _probe_keys_fake(ids, seed, step, stream):
    return torch.empty_like(ids)


@torch.library.register_fake("lorecomm::project_residual")
def _project_residual_fake(G, E, P, R, ok):
    return None


@torch.library.register_fake("lorecomm::decompress")
def _decompress_fake(P, Rbar, out):
    return None


@torch.library.register_fake("lorecomm::refresh_basis")
def _refresh_basis_fake(H):
    torch._check(H.dim() == 3, lambda: "refresh_basis: H must be 3-D")
    return H.new_empty((H.shape[0], H.shape[1], H.shape[1]), dtype=torch.float32)


# -------------------------------------------------------------------- wrappers
def _keys(keys, device) -> torch.Tensor:
    if isinstance(keys, torch.Tensor):
        return keys
    return torch.as_tensor(list(keys), dtype=torch.int64, device=device)


def probe_normal(keys: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, rows, cols) float32: ``out[i, x, y] = randn(keys[i], x*cols + y)``."""
    return _ops.probe_normal(_keys(keys, None), int(rows), int(cols))


def score_paper(G: torch.Tensor, E: torch.Tensor, U: torch.Tensor, keys) -> torch.Tensor:
    """(B, a) float32: ``lam[i, j] = sum_c (U^T (G+E))[j, c] * randn(keys[i], j*b + c)``."""
    return _ops.score_paper(G, E, U, _keys(keys, G.device))


def score_sketch(G: torch.Tensor, E: torch.Tensor, U: torch.Tensor, keys, k: int) -> torch.Tensor:
    """(B, a, k) float32: ``U^T ((G+E) S)`` with ``S[c, q] = randn(keys[i], c*k + q)``."""
    return _ops.score_sketch(G, E, U, _keys(keys, G.device), int(k))


def probe_keys(ids: torch.Tensor, seed: int, step: int, stream: int) -> torch.Tensor:
    """(B,) int64 Philox keys, ``probes.probe_key(seed, step, ids[i], stream)``, on ids' device."""
    return _ops.probe_keys(ids, int(seed), int(step), int(stream))


def range_sketch(G: torch.Tensor, E: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """(B, a, c) float32: ``(G+E) @ Q^T`` with Q (B, c, b): a sketch of the range of H."""
    return _ops.range_sketch(G, E, Q)


def project_residual(G: torch.Tensor, E: torch.Tensor, P: torch.Tensor, R: torch.Tensor,
                     ok) -> None:
    """``R = P^T (G+E)`` rounded to R.dtype; if ``ok``: ``E = (G+E) - P R`` with the
    rounded R (E untouched otherwise)."""
    if not isinstance(ok, torch.Tensor):
        ok = torch.tensor(bool(ok), device=G.device)
    _ops.project_residual(G, E, P, R, ok)


def decompress(P: torch.Tensor, Rbar: torch.Tensor, out: torch.Tensor) -> None:
    """``out = P @ Rbar`` rounded to ``out.dtype`` (out may be any strided view)."""
    _ops.decompress(P, Rbar, out)


def refresh_basis(H: torch.Tensor) -> torch.Tensor:
    """(B, a, a) float32: full left singular basis of each ``H[i]`` by descending
    singular value, canonical column signs, non-finite entries read as 0."""
    return _ops.refresh_basis(H)


# ------------------------------------------------------- CUDA kernels (Triton)
def _register_cuda() -> str | None:
    """Make the Triton launchers of ``lorecomm.kernels`` the CUDA kernels.

    Only on a CUDA (or ROCm) build of torch: a CPU-only torch has no CUDA
    tensors to dispatch, and not importing triton here keeps ``import lorecomm``
    light and leaves ``lorecomm.kernels`` free to be imported later under
    ``TRITON_INTERPRET=1`` (tests/test_kernels.py).
    """
    if torch.version.cuda is None and torch.version.hip is None:
        return None
    try:
        from .kernels import register_cuda_kernels
    except ImportError as exc:
        # Only a missing kernels package / triton is tolerated; anything else is a bug.
        missing = exc.name or ""
        if missing in ("lorecomm.kernels", "triton") or missing.startswith("triton."):
            return None
        raise
    return "triton" if register_cuda_kernels() else None


BACKEND = {
    "declared_in": "lorecomm._C (C++ TORCH_LIBRARY)",
    "cpu": "C++ (csrc/ops.cpp)",
    "cuda": _register_cuda(),  # "triton" when lorecomm.kernels registered its launchers
}
"""Which implementation serves each device (``cuda`` is None on CPU-only torch)."""
