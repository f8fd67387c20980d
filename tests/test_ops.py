"""The torch.ops.lorecomm kernels vs float64 references: the C++ CPU kernels (lorecomm._C), or the
CUDA ones with LORECOMM_TEST_DEVICE=cuda (tests/devices.py; bench/gpu_check.sh).

Each op is checked against an independent float64 torch reference written
here (probes from ``lorecomm.probes.probe_matrix``) on random shapes, gradient
dtypes and strided views (transposed G / out, R a view into a flat buffer),
edge sizes (a = 1, r = a, odd sizes, a > b, several column blocks, B = 1 and
B = 7), and with ``torch.library.opcheck``.
"""
from __future__ import annotations

import pytest
import torch

import lorecomm.ops
from devices import OnDevice, require_device, to_device
from lorecomm.probes import probe_matrix, probe_key

require_device()
ops = OnDevice(lorecomm.ops)  # every op on LORECOMM_TEST_DEVICE (tests/devices.py): CPU by default

lc = torch.ops.lorecomm

# (B, a, b, r): a = 1, r = a, odd sizes, a > b, several column blocks with a
# partial last block (the C++ kernels block columns by min(4096, 2**20 / a)).
SHAPES = [
    (1, 1, 1, 1),
    (1, 1, 37, 1),
    (7, 5, 9, 5),
    (2, 20, 6, 3),
    (3, 33, 130, 4),
    (1, 16, 4099, 7),
    (2, 40, 3001, 6),
    (7, 9, 70, 2),
    (2, 8, 9001, 3),
]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "strided"]


def _keys(B: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor([probe_key(seed, 3, p) for p in range(B)], dtype=torch.int64)


def _probes64(keys: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.stack([probe_matrix(int(k), rows, cols) for k in keys.tolist()]).double()


def _matrix(B, a, b, dtype, layout, gen) -> torch.Tensor:
    """A (B, a, b) tensor with the given memory layout."""
    if layout == "contiguous":
        return torch.randn(B, a, b, generator=gen).to(dtype)
    if layout == "transposed":  # like an oriented view of a (b, a) parameter
        return torch.randn(B, b, a, generator=gen).to(dtype).transpose(1, 2)
    # every other column of a wider buffer, batch stride with a gap
    big = torch.randn(B, a + 1, 2 * b + 1, generator=gen).to(dtype)
    return big[:, 1:, 1::2]


def _orthonormal(B, a, gen) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(B, a, a, generator=gen, dtype=torch.float64))
    return q.float()


def _close(actual, expected64, rel=2e-5):
    """float32 result vs float64 reference, tolerance scaled to the magnitude."""
    scale = expected64.abs().max().item() if expected64.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected64, rtol=rel, atol=rel * max(scale, 1.0))


# ------------------------------------------------------------------- probes
def test_probe_normal_matches_reference():
    keys = torch.tensor([0, 1, 2**63 - 1, probe_key(7, 11, 13)], dtype=torch.int64)
    out = ops.probe_normal(keys, 23, 301)
    assert out.shape == (4, 23, 301) and out.dtype == torch.float32
    ref = torch.stack([probe_matrix(int(k), 23, 301) for k in keys.tolist()])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # same Philox integers; float32 log/cos of libm vs numpy differ by a few ulp at most
    # strided keys
    sub = torch.stack([probe_matrix(int(k), 3, 5) for k in keys[::2].tolist()])
    torch.testing.assert_close(ops.probe_normal(keys[::2], 3, 5), sub, rtol=1e-6, atol=1e-6)
    assert ops.probe_normal(keys, 0, 5).shape == (4, 0, 5)


def test_probe_normal_statistics():
    x = ops.probe_normal(torch.tensor([123], dtype=torch.int64), 256, 256).double()
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1.0) < 0.02


# -------------------------------------------------------------------- score
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_score_paper(shape, dtype):
    B, a, b, _ = shape
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    layout = LAYOUTS[(a + b) % 3]
    G = _matrix(B, a, b, dtype, layout, gen)
    E = _matrix(B, a, b, torch.float32, LAYOUTS[(a + b + 1) % 3], gen)
    U = _orthonormal(B, a, gen)
    keys = _keys(B)
    lam = ops.score_paper(G, E, U, keys)
    H = G.double() + E.double()
    ref = ((U.double().transpose(1, 2) @ H) * _probes64(keys, a, b)).sum(-1)
    assert lam.shape == (B, a) and lam.dtype == torch.float32
    _close(lam, ref, rel=5e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 4])
def test_score_sketch(shape, k):
    B, a, b, _ = shape
    gen = torch.Generator().manual_seed(a * 1000 + b + k)
    dtype = GRAD_DTYPES[(a + k) % 3]
    G = _matrix(B, a, b, dtype, LAYOUTS[b % 3], gen)
    E = _matrix(B, a, b, torch.float32, LAYOUTS[a % 3], gen)
    U = _orthonormal(B, a, gen).transpose(1, 2).contiguous().transpose(1, 2)  # column-major U
    keys = _keys(B, seed=5)
    lam = ops.score_sketch(G, E, U, keys, k)
    H = G.double() + E.double()
    ref = U.double().transpose(1, 2) @ (H @ _probes64(keys, b, k))
    assert lam.shape == (B, a, k) and lam.dtype == torch.float32
    _close(lam, ref, rel=5e-5)


# --------------------------------------------------------- project_residual
def _flat_view(B, r, b, gap: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R as a (possibly row-padded) view into a flat communication buffer."""
    flat = torch.full((offset + B * r * (b + gap) + 5,), float("nan"))
    R = flat.as_strided((B, r, b), (r * (b + gap), b + gap, 1), offset)
    return flat, R


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_project_residual(shape, dtype):
    B, a, b, r = shape
    gen = torch.Generator().manual_seed(a * 7 + b * 3 + r)
    G = _matrix(B, a, b, dtype, LAYOUTS[(a + r) % 3], gen)
    E = _matrix(B, a, b, torch.float32, LAYOUTS[b % 3], gen)
    P = _orthonormal(B, a, gen)[:, :, :r]  # a strided slice of U, as the runtime gathers
    flat, R = _flat_view(B, r, b, gap=b % 2, offset=3)
    H = G.double() + E.double()
    R_ref = P.double().transpose(1, 2) @ H
    E_ref = H - P.double() @ R_ref
    before = flat.clone()
    ops.project_residual(G, E, P, R, torch.tensor(True))
    _close(R, R_ref)
    _close(E, E_ref)
    # nothing outside R's elements was written
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask.as_strided((B, r, b), (r * (b + b % 2), b + b % 2, 1), 3).fill_(False)
    assert torch.equal(flat[mask].isnan(), before[mask].isnan())


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 5, 9, 5), (2, 40, 3001, 6)])
def test_project_residual_not_ok_leaves_E_bitwise(shape):
    B, a, b, r = shape
    gen = torch.Generator().manual_seed(1)
    G = _matrix(B, a, b, torch.bfloat16, "transposed", gen)
    G[0, 0, 0] = float("inf")  # a non-finite step
    E = _matrix(B, a, b, torch.float32, "strided", gen)
    E[-1, -1, -1] = float("nan")
    E0 = E.clone()
    P = _orthonormal(B, a, gen)[:, :, :r]
    R = torch.empty(B, r, b)
    ops.project_residual(G, E, P, R, torch.tensor(False))
    assert torch.equal(E.view(torch.int32), E0.view(torch.int32))
    # R is still computed (P^T H): finite wherever H's column is finite
    R_ref = P.double().transpose(1, 2) @ (G.double() + E0.double())
    fin = R_ref.isfinite()
    _close(R[fin], R_ref[fin])
    # python bool accepted by the wrapper
    ops.project_residual(G, E, P, R, False)
    assert torch.equal(E.view(torch.int32), E0.view(torch.int32))


@pytest.mark.parametrize("shape", [(2, 20, 6, 3), (1, 16, 4099, 7)])
def test_project_residual_column_strided_R(shape):
    """R with non-unit column stride takes the copy-back path: same values."""
    B, a, b, r = shape
    gen = torch.Generator().manual_seed(5)
    G = _matrix(B, a, b, torch.float32, "contiguous", gen)
    E = _matrix(B, a, b, torch.float32, "contiguous", gen)
    P = _orthonormal(B, a, gen)[:, :, :r]
    big = torch.full((B, r, 2 * b), float("nan"))
    R = big[:, :, ::2]
    H = G.double() + E.double()
    R_ref = P.double().transpose(1, 2) @ H
    ops.project_residual(G, E, P, R, torch.tensor(True))
    _close(R, R_ref)
    _close(E, H - P.double() @ R_ref)
    assert big[:, :, 1::2].isnan().all()


@pytest.mark.parametrize("shape", SHAPES[2:6])
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_project_residual_low_precision_R(shape, wire):
    """R in a wire dtype: written rounded, and E = H - P R with the rounded R (the rounding
    error stays in the error buffer)."""
    B, a, b, r = shape
    gen = torch.Generator().manual_seed(a + b + r)
    G = _matrix(B, a, b, torch.float32, LAYOUTS[a % 3], gen)
    E = _matrix(B, a, b, torch.float32, "contiguous", gen)
    P = _orthonormal(B, a, gen)[:, :, :r]
    R = torch.empty(B, r, b, dtype=wire)
    H = G.double() + E.double()
    R_ref = (P.double().transpose(1, 2) @ H)
    ops.project_residual(G, E, P, R, torch.tensor(True))
    eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}[wire]
    _close(R, R_ref, rel=eps)
    _close(E, H - P.double() @ R.double())  # the rounded R, not R_ref


# --------------------------------------------------------------- range_sketch
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_range_sketch(shape, dtype):
    B, a, b, c = shape
    gen = torch.Generator().manual_seed(a * 5 + b + c)
    G = _matrix(B, a, b, dtype, LAYOUTS[(a + c) % 3], gen)
    E = _matrix(B, a, b, torch.float32, LAYOUTS[b % 3], gen)
    Q = torch.randn(B, c + 2, b, generator=gen)[:, 1:c + 1]  # a row slice, as the engine passes it
    Y = ops.range_sketch(G, E, Q)
    assert Y.shape == (B, a, c) and Y.dtype == torch.float32
    _close(Y, (G.double() + E.double()) @ Q.double().transpose(1, 2))


def test_probe_keys_match_the_reference():
    ids = torch.tensor([0, 1, 7, 123456, 2**40 + 3])
    for seed, step, stream in [(0, 0, 0), (3, 17, 2), (2**31 - 1, 10**9, 5)]:
        want = [probe_key(seed, step, int(i), stream) for i in ids]
        assert ops.probe_keys(ids, seed, step, stream).tolist() == want


def test_rank_zero_projects_nothing():
    gen = torch.Generator().manual_seed(6)
    G = _matrix(2, 5, 7, torch.bfloat16, "transposed", gen)
    E = _matrix(2, 5, 7, torch.float32, "strided", gen)
    H = G.double() + E.double()
    P, R = torch.empty(2, 5, 0), torch.empty(2, 0, 7)
    ops.project_residual(G, E, P, R, torch.tensor(True))
    _close(E, H)  # the residual is all of H
    out = torch.full((2, 5, 7), 3.0)
    ops.decompress(P, R, out)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_decompress_row_strided_fp32_out(shape):
    """fp32 rows with unit stride inside a wider bucket: GEMM writes in place, only there."""
    B, a, b, r = shape
    gen = torch.Generator().manual_seed(b + r)
    P = _orthonormal(B, a, gen)[:, :, :r]
    Rbar = _matrix(B, r, b, torch.float32, "contiguous", gen)
    bucket = torch.full((B, a, b + 3), 7.0)
    out = bucket[:, :, 1:b + 1]
    ops.decompress(P, Rbar, out)
    _close(out, P.double() @ Rbar.double())
    assert (bucket[:, :, 0] == 7).all() and (bucket[:, :, b + 1:] == 7).all()


# --------------------------------------------------------------- decompress
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_decompress(shape, dtype):
    B, a, b, r = shape
    gen = torch.Generator().manual_seed(a + 11 * b + r)
    P = _orthonormal(B, a, gen)[:, :, :r]
    Rbar = _matrix(B, r, b, torch.float32, LAYOUTS[(a + b) % 3], gen)
    # out: a transposed view into a flat bucket of the gradient dtype
    bucket = torch.zeros(7 + B * a * b + 3, dtype=dtype)
    out = bucket[7:7 + B * a * b].view(B, b, a).transpose(1, 2)
    ops.decompress(P, Rbar, out)
    ref = P.double() @ Rbar.double()
    if dtype == torch.float32:
        _close(out, ref)
    else:  # float32 maths, then one rounding to the bucket dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.double(), ref, rtol=eps, atol=eps * ref.abs().max().item())
    assert torch.count_nonzero(bucket[:7]) == 0 and torch.count_nonzero(bucket[-3:]) == 0


def test_decompress_contiguous_out_exact_rounding():
    gen = torch.Generator().manual_seed(3)
    P = _orthonormal(2, 12, gen)[:, :, :4].contiguous()
    Rbar = torch.randn(2, 4, 50, generator=gen)
    out = torch.empty(2, 12, 50, dtype=torch.bfloat16)
    ops.decompress(P, Rbar, out)
    ref32 = torch.empty(2, 12, 50)
    ops.decompress(P, Rbar, ref32)
    assert torch.equal(out, ref32.to(torch.bfloat16))  # round-to-nearest-even of the fp32 result


# ------------------------------------------------------------- refresh_basis
@pytest.mark.parametrize("B,a,b", [(1, 1, 5), (3, 6, 11), (2, 17, 40), (1, 8, 8)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_refresh_basis_is_the_left_singular_basis(B, a, b, layout):
    gen = torch.Generator().manual_seed(a * b)
    # distinct singular values, so the basis is unique up to column signs
    H64 = torch.linalg.qr(torch.randn(B, a, a, generator=gen, dtype=torch.float64))[0] @ \
        torch.diag_embed(torch.linspace(3.0, 0.5, a, dtype=torch.float64).expand(B, a)) @ \
        torch.linalg.qr(torch.randn(B, b, a, generator=gen, dtype=torch.float64))[0].mT
    H = _matrix(B, a, b, torch.float32, layout, gen)
    H.copy_(H64)
    U = ops.refresh_basis(H)
    assert U.dtype == torch.float32 and U.shape == (B, a, a)
    ref = torch.linalg.svd(H.double()).U  # float64 reference, descending singular values
    # canonical signs: each column's largest-magnitude entry is positive
    assert (U.gather(1, U.abs().argmax(1, keepdim=True)) > 0).all()
    signs = torch.sign((U.double() * ref).sum(1, keepdim=True))
    _close(U, ref * signs, rel=1e-5)
    _close(U.mT @ U, torch.eye(a, dtype=torch.float64).expand(B, a, a), rel=1e-5)


def test_refresh_basis_nonfinite_entries_read_as_zero():
    H = torch.tensor([[[3.0, float("nan"), 0.0], [0.0, float("inf"), 1.0]]])
    U = ops.refresh_basis(H)
    torch.testing.assert_close(U, torch.eye(2)[None])  # the basis of [[3, 0, 0], [0, 0, 1]]


# ------------------------------------------------------------------- opcheck
def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    B, a, b, r = 2, 6, 11, 3
    G = _matrix(B, a, b, torch.bfloat16, "transposed", gen)
    E = _matrix(B, a, b, torch.float32, "contiguous", gen)
    U = _orthonormal(B, a, gen)
    P = U[:, :, :r].contiguous()
    keys = _keys(B)
    flat = torch.zeros(B * r * b + 4)
    R = flat[4:].view(B, r, b)
    out = torch.zeros(B, b, a, dtype=torch.float16).transpose(1, 2)
    return {
        "probe_normal": (keys, 3, 5),
        "score_paper": (G, E, U, keys),
        "score_sketch": (G, E, U, keys, 4),
        "project_residual": (G, E, P, R, torch.tensor(True)),
        "project_residual_not_ok": (G, E, P, R, torch.tensor(False)),
        "decompress": (P, torch.randn(B, r, b, generator=gen), out),
        "decompress_low_precision_Rbar": (P, torch.randn(B, r, b, generator=gen).bfloat16(), out),
        "project_residual_low_precision_R": (G, E, P, torch.zeros(B, r, b, dtype=torch.bfloat16), torch.tensor(True)),
        "range_sketch": (G, E, torch.randn(B, r, b, generator=gen)),
        "probe_keys": (torch.arange(5), 3, 11, 2),
        "refresh_basis": (G,),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    args = _opcheck_cases()[name]
    base = name.replace("_not_ok", "").replace("_low_precision_Rbar", "").replace("_low_precision_R", "")
    op = getattr(lc, base).default
    torch.library.opcheck(op, to_device(args))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        G = torch.empty(3, 4, 9, dtype=torch.bfloat16)
        E = torch.empty(3, 4, 9)
        U = torch.empty(3, 4, 4)
        keys = torch.zeros(3, dtype=torch.int64)
        assert lc.score_paper(G, E, U, keys).shape == (3, 4)
        assert lc.score_sketch(G, E, U, keys, 5).shape == (3, 4, 5)
        assert lc.probe_normal(keys, 2, 7).shape == (3, 2, 7)
        assert lc.refresh_basis(G).shape == (3, 4, 4)
        assert lc.range_sketch(G, E, torch.empty(3, 2, 9)).shape == (3, 4, 2)
        assert lc.probe_keys(keys, 0, 1, 2).shape == (3,)


def test_backend_info():
    assert ops.BACKEND["cpu"].startswith("C++")
    import lorecomm._C as C

    assert set(C.ops) <= set(ops.__all__)
