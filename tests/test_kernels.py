"""Triton kernels (lorecomm.kernels) on CPU under the Triton interpreter, or compiled on a GPU
with LORECOMM_TEST_DEVICE=cuda (tests/devices.py; bench/gpu_check.sh).

Every launcher is checked against an independent float64 torch reference
(probes from ``lorecomm.probes.probe_matrix``) on small random shapes, edge
sizes, gradient dtypes and strided views. TRITON_INTERPRET must be set before
the kernels' modules are imported (``triton.jit`` picks the interpreter at
decoration time), so it is set here first and the package is re-imported if
something imported it earlier without the interpreter.
"""
from __future__ import annotations

import os

from devices import DEVICE, OnDevice, require_device  # noqa: E402  (imports no triton)

if not (DEVICE or "").startswith("cuda"):  # a GPU run (bench/gpu_check.sh) compiles them for real
    os.environ["TRITON_INTERPRET"] = "1"
require_device()

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_kernels():
    """``lorecomm.kernels`` (setup.py maps ``kernels/`` to it), with its Triton functions interpreted."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return importlib.import_module("lorecomm.kernels")
    for name in [m for m in sys.modules if m == "lorecomm.kernels" or m.startswith("lorecomm.kernels.")]:
        mod = sys.modules[name]
        fns = [getattr(mod, f) for f in dir(mod) if f.startswith("_") and f.endswith("_kernel")]
        if any(type(f).__name__ != "InterpretedFunction" for f in fns):
            del sys.modules[name]  # imported before TRITON_INTERPRET was set
    return importlib.import_module("lorecomm.kernels")  # setup.py maps kernels/ to it


K = OnDevice(_load_kernels())  # every launcher on LORECOMM_TEST_DEVICE (tests/devices.py)
from lorecomm.probes import probe_matrix  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# probes vs lorecomm.probes (numpy): the interpreter gives numpy's bits (1 ulp of slack); a GPU's libdevice
# log/cos and sqrt.approx differ by a few ulp (the CPU C++ ops, another libm, by up to 4)
PROBE_ULPS = 4 if (DEVICE or "").startswith("cuda") else 1
KEYS = [0, 1, 12345, 2**32 - 1, 2**32, 2**32 + 1, 0x9E3779B97F4A7C1, 2**63 - 1]


# ---------------------------------------------------------------- helpers
def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _rand(gen, shape, layout="contig", dtype=torch.float32):
    """A (B, x, y) tensor with the given memory layout, values N(0,1)."""
    B, x, y = shape
    if layout == "contig":
        t = torch.randn(B, x, y, generator=gen)
    elif layout == "transposed":  # e.g. G[i] the transposed view of a bucket slice
        t = torch.randn(B, y, x, generator=gen).transpose(1, 2)
    elif layout == "padded":  # slices of a larger tensor: odd row/batch strides
        t = torch.randn(B + 1, x + 3, y + 5, generator=gen)[1:, 2:x + 2, 1:y + 1]
    elif layout == "flat":  # view into a flat buffer at an offset (comm buffer)
        buf = torch.randn(7 + B * x * y + 3, generator=gen)
        t = buf[7:7 + B * x * y].view(B, x, y)
    elif layout == "flat_t":  # transposed view into a flat buffer
        buf = torch.randn(5 + B * x * y, generator=gen)
        t = buf[5:].view(B, y, x).transpose(1, 2)
    else:
        raise ValueError(layout)
    if dtype != torch.float32:  # same layout, low-precision storage
        t = _like_layout(t.to(dtype), layout, B, x, y, dtype)
    assert t.shape == (B, x, y)
    return t


def _like_layout(src, layout, B, x, y, dtype):
    if layout == "transposed":
        t = torch.empty(B, y, x, dtype=dtype).transpose(1, 2)
    elif layout == "padded":
        t = torch.zeros(B + 1, x + 3, y + 5, dtype=dtype)[1:, 2:x + 2, 1:y + 1]
    elif layout == "flat":
        t = torch.zeros(7 + B * x * y + 3, dtype=dtype)[7:7 + B * x * y].view(B, x, y)
    elif layout == "flat_t":
        t = torch.zeros(5 + B * x * y, dtype=dtype)[5:].view(B, y, x).transpose(1, 2)
    else:
        return src.clone()
    t.copy_(src)
    return t


def _orth(gen, B, a):
    q, _ = torch.linalg.qr(torch.randn(B, a, a, generator=gen, dtype=torch.float64))
    return q.float()


def _keys(gen, B):
    idx = torch.randint(0, len(KEYS), (B,), generator=gen)
    k = torch.tensor([KEYS[int(i)] for i in idx], dtype=torch.int64)
    return k ^ torch.randint(0, 2**20, (B,), generator=gen)  # stays in [0, 2**63)


def _probes(keys, rows, cols):
    return torch.stack([probe_matrix(int(k), rows, cols) for k in keys]).double()


def _close(x, ref, tol=3e-6, what=""):
    x = x.double()
    err = (x - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() + 1.0 if ref.numel() else 1.0
    assert err <= tol * scale, f"{what}: max err {err:.3g} > {tol:.1g} * {scale:.3g}"


# float64 references (docs/OPS.md)
def ref_score_paper(G, E, U, keys):
    H = G.double() + E.double()
    Z = U.double().transpose(1, 2) @ H
    B, a, b = G.shape
    return (Z * _probes(keys, a, b)).sum(-1)


def ref_score_sketch(G, E, U, keys, k):
    H = G.double() + E.double()
    S = _probes(keys, G.shape[2], k)
    return U.double().transpose(1, 2) @ (H @ S)


def ref_project_residual(G, E, P, ok):
    H = G.double() + E.double()
    R = P.double().transpose(1, 2) @ H
    return R, (H - P.double() @ R) if ok else E.double()


# ---------------------------------------------------------------- probe_normal
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (17, 33), (1, 70)])
def test_probe_normal_matches_reference(rows, cols):
    keys = torch.tensor(KEYS, dtype=torch.int64)
    out = K.probe_normal(keys, rows, cols)
    assert out.shape == (len(KEYS), rows, cols) and out.dtype == torch.float32
    ref = torch.stack([probe_matrix(int(k), rows, cols) for k in KEYS])
    ulps = (out.view(torch.int32).long() - ref.view(torch.int32).long()).abs().max().item()
    assert ulps <= PROBE_ULPS, f"probe_normal differs from lorecomm.probes by {ulps} ulp"


def test_probe_normal_strided_keys_and_empty():
    keys = torch.tensor(KEYS, dtype=torch.int64)[::2]
    out = K.probe_normal(keys, 4, 5)
    ref = torch.stack([probe_matrix(int(k), 4, 5) for k in keys])
    if (DEVICE or "").startswith("cuda"):
        assert (out.view(torch.int32).long() - ref.view(torch.int32).long()).abs().max().item() <= PROBE_ULPS
    else:  # the interpreter computes with numpy, as the reference does: the same bits
        assert torch.equal(out, ref)
    assert K.probe_normal(keys, 0, 5).shape == (len(keys), 0, 5)


# ---------------------------------------------------------------- shapes
# (B, a, b, r): edge sizes a = 1, r = a, odd sizes, a > b, batch 1 and many
CASES = [
    (1, 1, 1, 1),
    (1, 1, 23, 1),
    (3, 5, 5, 5),
    (2, 17, 33, 4),
    (1, 33, 70, 16),
    (2, 40, 21, 40),
    (16, 4, 9, 2),
    (2, 64, 65, 17),
    (64, 3, 5, 2),
]
LAYOUTS = ["contig", "transposed", "padded", "flat_t"]


def _case_inputs(seed, B, a, b, dtype, layout):
    gen = _gen(seed)
    G = _rand(gen, (B, a, b), layout, dtype)
    E = _rand(gen, (B, a, b), "padded" if layout != "contig" else "contig")
    return gen, G, E


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_paper(case, dtype):
    B, a, b, _ = case
    layout = LAYOUTS[(a + b) % len(LAYOUTS)]
    gen, G, E = _case_inputs(a * 100 + b, B, a, b, dtype, layout)
    U = _orth(gen, B, a)
    if a > 3:
        U = U.transpose(1, 2).contiguous().transpose(1, 2)  # column-major basis
    keys = _keys(gen, B)
    lam = K.score_paper(G, E, U, keys)
    assert lam.shape == (B, a) and lam.dtype == torch.float32
    _close(lam, ref_score_paper(G, E, U, keys), 1e-5, "score_paper")


def test_score_paper_blocks_and_determinism():
    gen, G, E = _case_inputs(7, 2, 37, 53, torch.float32, "transposed")
    U, keys = _orth(gen, 2, 37), _keys(gen, 2)
    ref = ref_score_paper(G, E, U, keys)
    lam1 = K.score_paper(G, E, U, keys, block_j=16, block_k=16, block_n=16)
    lam2 = K.score_paper(G, E, U, keys, block_j=16, block_k=16, block_n=16)
    assert torch.equal(lam1, lam2)  # no atomics: bitwise reproducible
    _close(lam1, ref, 1e-5, "score_paper small blocks")
    _close(K.score_paper(G, E, U, keys, precision="tf32x3"), ref, 1e-5, "tf32x3")


@pytest.mark.parametrize("case", CASES[::2] + [CASES[3]])
@pytest.mark.parametrize("k", [1, 4, 17])
@pytest.mark.parametrize("split", [None, 3])
def test_score_sketch(case, k, split):
    B, a, b, _ = case
    dtype = DTYPES[(a + k) % 3]
    layout = LAYOUTS[(b + k) % len(LAYOUTS)]
    gen, G, E = _case_inputs(a * 31 + k, B, a, b, dtype, layout)
    U, keys = _orth(gen, B, a), _keys(gen, B)
    lam = K.score_sketch(G, E, U, keys, k, split=split, block_n=16)
    assert lam.shape == (B, a, k) and lam.dtype == torch.float32
    _close(lam, ref_score_sketch(G, E, U, keys, k), 1e-5, "score_sketch")


def test_score_sketch_deterministic_over_splits():
    gen, G, E = _case_inputs(9, 3, 21, 70, torch.bfloat16, "padded")
    U, keys = _orth(gen, 3, 21), _keys(gen, 3)
    ref = ref_score_sketch(G, E, U, keys, 4)
    outs = [K.score_sketch(G, E, U, keys, 4, split=s, block_n=16) for s in (1, 2, 5, 5)]
    assert torch.equal(outs[2], outs[3])
    for o in outs:
        _close(o, ref, 1e-5, "score_sketch split")


# ---------------------------------------------------------------- range_sketch
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("split", [None, 2])
def test_range_sketch(case, split):
    B, a, b, c = case
    dtype = DTYPES[(a + c) % 3]
    layout = LAYOUTS[(b + c) % len(LAYOUTS)]
    gen, G, E = _case_inputs(a * 17 + c, B, a, b, dtype, layout)
    Q = _rand(gen, (B, c + 1, b), "padded")[:, :c]  # a row slice, as the engine passes it
    Y = K.range_sketch(G, E, Q, split=split, block_n=16)
    assert Y.shape == (B, a, c) and Y.dtype == torch.float32
    _close(Y, (G.double() + E.double()) @ Q.double().transpose(1, 2), 1e-5, "range_sketch")


# ---------------------------------------------------------------- project_residual
PR_PATHS = [{}, {"max_block_a": 16}, {"max_block_a": 16, "block_r": 16, "split": 2}]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_residual(case, dtype):
    B, a, b, r = case
    layout = LAYOUTS[(a * 3 + b) % len(LAYOUTS)]
    gen, G, E = _case_inputs(a * 7 + b + r, B, a, b, dtype, layout)
    U = _orth(gen, B, a)
    P = U[:, :, torch.randperm(a, generator=gen)[:r]]  # strided gather -> copy, then view
    P = P.transpose(1, 2).contiguous().transpose(1, 2) if r > 2 else P
    R = _rand(gen, (B, r, b), "flat" if r % 2 else "flat_t")
    R.fill_(float("nan"))  # must be fully overwritten
    Rref, Eref = ref_project_residual(G, E, P, True)
    E0 = E.clone()
    path = PR_PATHS[(a + b) % len(PR_PATHS)]
    K.project_residual(G, E, P, R, torch.tensor(True), **path)
    _close(R, Rref, 1e-5, "R")
    _close(E, Eref, 1e-5, "E")
    # ok = False: R written, E bitwise untouched
    R.fill_(float("nan"))
    K.project_residual(G, E0_copy := E0.clone(), P, R, torch.tensor(False), **path)
    assert torch.equal(E0_copy, E0)
    _close(R, Rref, 1e-5, "R (ok=False)")


@pytest.mark.parametrize("path", PR_PATHS)
def test_project_residual_paths(path):
    """Every code path (H in registers; split over a, one or several chunks of r)."""
    B, a, b, r = 2, 37, 29, 20
    gen, G, E = _case_inputs(11, B, a, b, torch.float32, "transposed")
    P = _orth(gen, B, a)[:, :, :r]
    R = torch.empty(B, r, b)
    Rref, Eref = ref_project_residual(G, E, P, True)
    K.project_residual(G, E, P, R, torch.tensor(True), **path)
    _close(R, Rref, 1e-5, "R")
    _close(E, Eref, 1e-5, "E")


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
def test_project_residual_nonfinite_step_keeps_E():
    gen, G, E = _case_inputs(3, 2, 9, 13, torch.bfloat16, "contig")
    G[1, 2, 3] = float("inf")
    P = _orth(gen, 2, 9)[:, :, :3]
    E0 = E.clone()
    R = torch.empty(2, 3, 13)
    K.project_residual(G, E, P, R, torch.tensor(False))
    assert torch.equal(E, E0)
    assert not torch.isfinite(R[1]).all()


@pytest.mark.parametrize("path", PR_PATHS)
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_project_residual_low_precision_R(path, wire):
    """R in a wire dtype: rounded to nearest even as the GPU rounds, E uses the rounded R."""
    B, a, b, r = 2, 37, 29, 20
    gen, G, E = _case_inputs(13, B, a, b, torch.float32, "padded")
    P = _orth(gen, B, a)[:, :, :r]
    R = torch.empty(B, r, b, dtype=wire)
    H = G.double() + E.double()
    K.project_residual(G, E, P, R, torch.tensor(True), **path)
    Rref = (P.double().transpose(1, 2) @ H)
    _close(R, Rref, {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}[wire], "R wire")
    _close(E, H - P.double() @ R.double(), 1e-5, "E with the rounded R")


def test_project_residual_r0():
    gen, G, E = _case_inputs(4, 2, 5, 6, torch.float16, "contig")
    P, R = torch.empty(2, 5, 0), torch.empty(2, 0, 6)
    Eref = G.double() + E.double()
    K.project_residual(G, E, P, R, torch.tensor(True))
    _close(E, Eref, 1e-6, "E r=0")


# ---------------------------------------------------------------- decompress
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decompress(case, dtype):
    B, a, b, r = case
    gen = _gen(a * 13 + b * 3 + r)
    P = _orth(gen, B, a)[:, :, :r]
    Rbar = _rand(gen, (B, r, b), "flat_t" if b % 2 else "flat")
    layout = LAYOUTS[(a + r) % len(LAYOUTS)]
    out = _like_layout(torch.zeros(B, a, b, dtype=dtype), layout, B, a, b, dtype)
    out.fill_(float("nan"))
    K.decompress(P, Rbar, out, block_r=16)
    assert out.dtype == dtype
    ref = P.double() @ Rbar.double()
    eps = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}[dtype]
    _close(out, ref, eps, f"decompress {dtype}")
    if dtype != torch.float32:  # rounded to nearest from the fp32 result: within 1 ulp
        want = ref.to(dtype)
        ulps = (out.contiguous().view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert ulps.max().item() <= 1, f"decompress {dtype}: {ulps.max().item()} ulp"


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_decompress_rounding_and_nonfinite():
    P = torch.ones(1, 1, 1)
    vals = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8 + 2.0**-20, -2.5,
                         3.3895e38, float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40])
    for dtype in (torch.bfloat16, torch.float16):
        out = torch.empty(1, 1, vals.numel(), dtype=dtype)
        K.decompress(P, vals.view(1, 1, -1), out)
        want = vals.to(dtype)
        same = (out == want) | (out.isnan() & want.isnan())
        assert same.all(), (dtype, out, want)


# ---------------------------------------------------------------- registration, bench
def test_register_cuda_kernels_is_safe():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        names = K.register_cuda_kernels()
    declared = set(K.ops_declared())
    assert set(names) == declared
    if len(declared) < len(K.LAUNCHERS):
        assert any("not declared" in str(x.message) for x in w)
    assert set(K.LAUNCHERS) == {"probe_normal", "score_paper", "score_sketch", "range_sketch",
                                "project_residual", "decompress"}


def test_bench_quick_runs_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--quick", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "project_residual" in res.stdout and "decompress" in res.stdout
    # every op of the compressed step, each checked against float64 (the last column)
    for op in ("score_sketch", "range_sketch"):
        rows = [line for line in res.stdout.splitlines() if line.startswith(f"| {op} |")]
        assert rows and all(float(line.strip("| ").split("|")[-1]) < 1e-5 for line in rows), op
    assert "no speed claim" in res.stdout.lower()


# ---------------------------------------------------------------- CPU C++ ops agreement
@pytest.mark.parametrize("case", [(1, 1, 1, 1), (2, 17, 33, 4), (3, 5, 5, 5), (2, 40, 21, 40)])
def test_triton_matches_cpu_ops(case):
    """The Triton kernels (interpreter) and the C++ CPU ops give the same numbers, probes included."""
    import lorecomm._C  # noqa: F401  -- must build: fails loudly if the C++ library is missing
    ops = torch.ops.lorecomm
    B, a, b, r = case
    gen, G, E = _case_inputs(a + 5 * b, B, a, b, torch.bfloat16, "transposed")
    U, keys = _orth(gen, B, a), _keys(gen, B)
    p_t, p_c = K.probe_normal(keys, a, b), ops.probe_normal(keys, a, b)
    # same Philox bits; log/cos/sqrt rounding of two libms: a few ulp (measured <= 4)
    torch.testing.assert_close(p_t, p_c, rtol=1e-6, atol=1e-6)
    _close(K.score_paper(G, E, U, keys), ops.score_paper(G, E, U, keys).double(), 1e-5, "paper")
    _close(K.score_sketch(G, E, U, keys, 3), ops.score_sketch(G, E, U, keys, 3).double(), 1e-5, "sketch")
    P = U[:, :, :r].contiguous()
    for ok in (True, False):
        E_t, E_c = E.clone(), E.clone()
        R_t, R_c = torch.empty(B, r, b), torch.empty(B, r, b)
        K.project_residual(G, E_t, P, R_t, torch.tensor(ok))
        ops.project_residual(G, E_c, P, R_c, torch.tensor(ok))
        _close(R_t, R_c.double(), 1e-5, "R")
        _close(E_t, E_c.double(), 1e-5, "E")
        if not ok:
            assert torch.equal(E_t, E) and torch.equal(E_c, E)
    Q = _rand(gen, (B, r, b), "flat")
    Y_t, Y_c = K.range_sketch(G, E, Q), ops.range_sketch(G, E, Q)
    _close(Y_t, Y_c.double(), 1e-5, "range_sketch")
    for wire in (torch.bfloat16, torch.float16):
        R_t, R_c = torch.empty(B, r, b, dtype=wire), torch.empty(B, r, b, dtype=wire)
        E_t, E_c = E.clone(), E.clone()
        K.project_residual(G, E_t, P, R_t, torch.tensor(True))
        ops.project_residual(G, E_c, P, R_c, torch.tensor(True))
        ulps = (R_t.view(torch.int16).int() - R_c.view(torch.int16).int()).abs().max().item()
        assert ulps <= 1, f"R {wire}: {ulps} ulp"
    Rbar = _rand(gen, (B, r, b), "flat_t")
    for dtype in DTYPES:
        o_t = _like_layout(torch.zeros(B, a, b, dtype=dtype), "transposed", B, a, b, dtype)
        o_c = o_t.clone()
        K.decompress(P, Rbar, o_t)
        ops.decompress(P, Rbar, o_c)
        if dtype == torch.float32:
            _close(o_t, o_c.double(), 1e-5, "decompress")
        else:
            ulps = (o_t.contiguous().view(torch.int16).int() - o_c.contiguous().view(torch.int16).int()).abs()
            assert ulps.max().item() <= 1, f"decompress {dtype}: {ulps.max().item()} ulp"
