#!/usr/bin/env python
"""Static check of every Triton kernel configuration for a GPU target, without a GPU.

For the benchmark shapes (4096x4096, 4096x11008, 11008x4096 and a batch of four
4096x4096; r = 8, 32, 128; fp32 / bf16 / fp16 gradients) each launcher of
lorecomm.kernels is called with meta tensors and a device of 132 SMs (an H200),
so it picks exactly the configurations it would pick there; its launches are
captured instead of run. Every distinct configuration is compiled ahead of
time for the target (``triton.compile(..., target=GPUTarget("cuda", 90, 32))``)
and ``ptxas -v`` (the Triton wheel ships ptxas; the newest one that accepts
the PTX is used) reports registers, spill stores/loads and the stack frame; shared memory comes from the compiled kernel. Occupancy (CTAs
per SM) is computed from registers, shared memory and warps for the target;
the grid against the SMs, and the bytes each CTA streams (the op's minimum
traffic over its CTAs).

Findings (printed, and failed with --check): a configuration that spills, or
that cannot fill the SMs twice (grid < 2 x SMs) for a large shape.

    python bench/kernels_static.py                          # sm_90, writes bench/results/kernels-sm90-static.md
    python bench/kernels_static.py --arch 100 --out -       # sm_100 (Blackwell) with the wheel's ptxas-blackwell
    python bench/kernels_static.py --quick --check          # what the tests run
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions: their signatures compile for a target
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from comm_util import git_commit  # noqa: E402

SMS = 132  # H200 / H100 SXM
# per-SM limits, sm_90 and sm_100 alike: registers, shared memory (bytes), threads, CTAs
SM_LIMITS = dict(regs=65536, smem=228 * 1024, smem_per_cta=227 * 1024, threads=2048, ctas=32)
SHAPES = [((1, 4096, 4096), "4096x4096"), ((1, 4096, 11008), "4096x11008"),
          ((1, 4096, 11008), "11008x4096 (oriented: transposed view)"), ((4, 4096, 4096), "4 x 4096x4096")]
QUICK_SHAPES = [((1, 4096, 4096), "4096x4096")]
RANKS = [8, 32, 128]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_TT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
       torch.bool: "i1", torch.int32: "i32"}


def _kernels():
    import lorecomm.kernels as K
    from lorecomm.kernels import (decompress, probe_normal, project_residual, range_sketch, score_paper,
                                  score_sketch)
    mods = [decompress, probe_normal, project_residual, range_sketch, score_paper, score_sketch]
    mods = [sys.modules[m.__module__] for m in mods]
    return K, mods


class Capture:
    """Replaces every ``kernel[grid](...)`` of the kernel modules by a recorder."""

    def __init__(self, mods):
        self.mods = mods
        self.launches = []
        self._saved = []

    def __enter__(self):
        import triton

        from lorecomm.kernels import _common

        self._saved.append((_common, "num_sms", _common.num_sms))
        _common.num_sms = lambda t: SMS
        for mod in self.mods:
            for name in dir(mod):
                fn = getattr(mod, name)
                if isinstance(fn, triton.runtime.jit.JITFunction):
                    self._saved.append((mod, name, fn))
                    setattr(mod, name, _Recorder(fn, self.launches))
        return self

    def __exit__(self, *exc):
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()


class _Recorder:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.out.append((self.fn, tuple(grid), args, kwargs))
        return launch


def _signature(fn, args, kwargs):
    """(signature, constexprs, num_warps) for triton.compile from one captured launch."""
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    sig, const = {}, {}
    names = fn.arg_names
    params = {p.name: p for p in fn.params}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TT[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    for name in names[len(args):]:
        if params[name].is_constexpr:
            sig[name] = "constexpr"
            const[name] = kwargs[name]
        else:
            raise TypeError(f"{fn.__name__}: argument {name} missing")
    return sig, const, num_warps


def _ptxas_candidates():
    """ptxas binaries that may accept the PTX Triton emits (the newest first: PTX versions only grow)."""
    import shutil

    import triton.backends.nvidia as nv

    d = pathlib.Path(nv.__file__).parent / "bin"
    found = [str(p) for p in (d / "ptxas-blackwell", d / "ptxas") if p.exists()]
    for extra in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if extra and os.path.exists(extra) and extra not in found:
            found.append(extra)
    return found


def compile_one(fn, sig, const, num_warps, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    # ptxas -v on the PTX Triton emitted: registers and spills (the cubin's stack frame alone cannot tell
    # spills from local arrays)
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    errors = []
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(ck.asm["ptx"])
        for exe in _ptxas_candidates():
            r = subprocess.run([exe, f"--gpu-name={sm}", "-v", "-o", os.path.join(d, "k.cubin"), ptx],
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            errors.append(f"{exe}: {(r.stderr + r.stdout).strip().splitlines()[-1:]}")
        else:
            raise RuntimeError(f"no ptxas accepts the PTX of {fn.__name__} for {sm}: {errors}")
    info = r.stderr + r.stdout
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", info).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    smem = int(getattr(ck.metadata, "shared", 0))
    return dict(regs=regs, stack=stack, spills=spills, smem=smem, num_warps=num_warps)


def occupancy(regs, smem, num_warps):
    threads = 32 * num_warps
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = SM_LIMITS["regs"] // (regs_per_warp * num_warps)
    by_smem = SM_LIMITS["smem"] // smem if smem else SM_LIMITS["ctas"]
    return max(0, min(SM_LIMITS["ctas"], SM_LIMITS["threads"] // threads, by_regs, by_smem))


def min_bytes(op, B, a, b, r, g):
    """The op's minimum memory traffic (docs/OPS.md, bench/KERNELS.md)."""
    n = B * a * b
    return {"score_paper": n * (g + 4) + 4 * B * a * a,
            "score_sketch": n * (g + 4) + 4 * B * a * a,
            "range_sketch": n * (g + 4) + 4 * B * r * b,
            "project_residual": n * (g + 8) + 4 * B * (a * r + r * b),
            "decompress": n * g + 4 * B * (a * r + r * b),
            "probe_normal": 4 * n}[op]


def configurations(quick: bool):
    """(op, label, launcher thunk over meta tensors) for every benchmark configuration."""
    K, _ = _kernels()
    meta = torch.device("meta")
    shapes = QUICK_SHAPES if quick else SHAPES
    ranks = [32] if quick else RANKS
    dtypes = [torch.bfloat16] if quick else DTYPES
    for (B, a, b), sname in shapes:
        transposed = "transposed" in sname

        def G(dt, B=B, a=a, b=b, transposed=transposed):
            return (torch.empty(B, b, a, dtype=dt, device=meta).transpose(1, 2) if transposed
                    else torch.empty(B, a, b, dtype=dt, device=meta))

        E = torch.empty(B, a, b, device=meta)
        U = torch.empty(B, a, a, device=meta)
        keys = torch.empty(B, dtype=torch.int64, device=meta)
        ok = torch.empty((), dtype=torch.bool, device=meta)
        for dt in dtypes:
            g = torch.tensor([], dtype=dt).element_size()
            yield "score_paper", f"{sname} {_TT[dt]}", (B, a, b, 0, g), lambda G=G, dt=dt: K.score_paper(G(dt), E, U, keys)
            yield "score_sketch", f"{sname} {_TT[dt]} k=4", (B, a, b, 0, g), \
                lambda G=G, dt=dt: K.score_sketch(G(dt), E, U, keys, 4)
            for r in ranks:
                P = torch.empty(B, a, r, device=meta)
                Q = torch.empty(B, r, b, device=meta)
                for wire in (torch.float32, torch.bfloat16):
                    Rw = torch.empty(B, r, b, dtype=wire, device=meta)
                    yield "project_residual", f"{sname} {_TT[dt]} r={r} R {_TT[wire]}", (B, a, b, r, g), \
                        lambda G=G, dt=dt, P=P, Rw=Rw: K.project_residual(G(dt), E, P, Rw, ok)
                yield "range_sketch", f"{sname} {_TT[dt]} r={r}", (B, a, b, r, g), \
                    lambda G=G, dt=dt, Q=Q: K.range_sketch(G(dt), E, Q)
                yield "decompress", f"{sname} {_TT[dt]} r={r}", (B, a, b, r, g), \
                    lambda G=G, dt=dt, P=P, Q=Q: K.decompress(P, Q.bfloat16(), G(dt))
    yield "probe_normal", "4096x4096", (1, 4096, 4096, 0, 4), lambda: K.probe_normal(
        torch.empty(1, dtype=torch.int64, device=meta), 4096, 4096)


def run(arch: int, quick: bool):
    _, mods = _kernels()
    compiled: dict = {}
    rows = []
    for op, label, (B, a, b, r, g), thunk in configurations(quick):
        with Capture(mods) as cap:
            thunk()
        total = min_bytes(op, B, a, b, r, g)
        grids = [math.prod(grid) for _, grid, _, _ in cap.launches]
        for fn, grid, args, kwargs in cap.launches:
            sig, const, nw = _signature(fn, args, kwargs)
            key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in const.items())), nw)
            if key not in compiled:
                compiled[key] = compile_one(fn, sig, const, nw, arch)
            res = compiled[key]
            ctas = occupancy(res["regs"], res["smem"], nw)
            n = math.prod(grid)
            big = a * b * B >= 4096 * 4096
            findings = []
            if res["spills"]:
                findings.append(f"spills {res['spills']} B")
            if big and n < 2 * SMS and n == max(grids):
                findings.append(f"grid {n} < 2 x {SMS} SMs")
            rows.append(dict(op=op, config=label, kernel=fn.__name__,
                             constexprs=", ".join(f"{k}={v}" for k, v in const.items()), warps=nw,
                             regs=res["regs"], spills=res["spills"], stack=res["stack"], smem=res["smem"],
                             ctas_per_sm=ctas, grid=n, waves=n / (SMS * max(ctas, 1)),
                             bytes_per_cta=total / max(1, sum(grids)), findings="; ".join(findings)))
    return rows


def _fmt_bytes(x):
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1024 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024


def report(rows, arch, argv):
    import triton

    commit = git_commit()
    bad = [r for r in rows if r["findings"]]
    L = [f"# Triton kernels compiled for sm_{arch} without a GPU (static)", "",
         f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}; "
         f"triton {triton.__version__}, torch {torch.__version__}",
         f"- command: `python bench/kernels_static.py {' '.join(argv)}`".rstrip(), "",
         f"Each launcher of lorecomm.kernels called on meta tensors as on a {SMS}-SM device (an H200), its "
         "launches captured and compiled ahead of time for the target; registers, spill stores + loads and the stack frame from "
         "`ptxas -v` on the emitted PTX, shared memory from the compiled kernel, CTAs per SM from registers / shared memory / warps "
         f"(per SM: {SM_LIMITS['regs']} registers, {SM_LIMITS['smem'] // 1024} KB shared, {SM_LIMITS['threads']} "
         "threads), waves = grid / (SMs x CTAs per SM), bytes per CTA = the op's minimum traffic over all its "
         "CTAs. Integer arguments are compiled unspecialised (at run time Triton may specialise values of 1 and "
         "multiples of 16: the same or better code). A finding is a configuration that spills, or whose largest "
         f"grid cannot fill the SMs twice (< {2 * SMS} CTAs) for a large shape.", "",
         f"**{len(bad)} finding(s)** in {len(rows)} launches ({len({(r['kernel'], r['constexprs'], r['warps']) for r in rows})} "
         "distinct compiled configurations).", "",
         "| op | configuration | kernel | constexprs | warps | regs | spills | stack | smem | CTAs/SM | grid | waves | "
         "bytes/CTA | finding |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['op']} | {r['config']} | {r['kernel']} | {r['constexprs']} | {r['warps']} | {r['regs']} | "
                 f"{r['spills']} | {r['stack']} | {_fmt_bytes(r['smem'])} | {r['ctas_per_sm']} | {r['grid']} | "
                 f"{r['waves']:.2f} | {_fmt_bytes(r['bytes_per_cta'])} | {r['findings'] or '-'} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper, 100: Blackwell)")
    ap.add_argument("--quick", action="store_true", help="one shape, rank 32, bf16 (the tests)")
    ap.add_argument("--out", default=None,
                    help="markdown output ('-': stdout only; default bench/results/kernels-sm<arch>-static.md)")
    ap.add_argument("--check", action="store_true", help="exit 1 on any finding")
    args = ap.parse_args(argv)
    rows = run(args.arch, args.quick)
    md = report(rows, args.arch, argv if argv is not None else sys.argv[1:])
    out = args.out or str(ROOT / "bench" / "results" / f"kernels-sm{args.arch}-static.md")
    if out != "-":
        with open(out, "w") as fh:
            fh.write(md)
    bad = [r for r in rows if r["findings"]]
    print(md if out == "-" else f"{len(rows)} launches, {len(bad)} finding(s): {out}")
    for r in bad:
        print(f"FINDING {r['op']} {r['config']}: {r['findings']} ({r['kernel']} {r['constexprs']})", file=sys.stderr)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
