#!/usr/bin/env python
"""Benchmark of the fused compressed-step kernels (lorecomm.kernels, docs/OPS.md).

For each shape (B matrices of a x b), rank r and op, reports: the minimum
bytes the op must move (read G and E once, write E and the output once, plus
the small factors), the fused kernel's time and achieved GB/s, the device's
measured copy bandwidth (a torch copy, read+write counted), the ratio, and
the unfused torch sequence timed in the same run; the paper score is also
reported as a GEMM (2*a*a*b flops) against the tf32 matrix peak.

On CUDA the Triton kernels run natively. Without CUDA the benchmark still
runs so that it is tested: the Triton launchers under TRITON_INTERPRET=1
(set automatically, tiny shapes: use --quick) and the CPU ops
torch.ops.lorecomm.* when lorecomm._C is built. CPU numbers are printed
without any speed claim.

Targets (issue 3, on an H100): project_residual and decompress >= 80% of
copy bandwidth and >= 2x the unfused sequence; sketch score within 1.2x of
one read of G and E; paper score >= 50% of the tf32 peak.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from comm_util import git_commit  # noqa: E402

# dense tf32 tensor-core peaks (TFLOP/s, no sparsity), by device-name substring
TF32_PEAK = {"H200": 494.7, "H100 SXM": 494.7, "H100 NVL": 417.5, "H100 PCIe": 378.0,
             "H100": 494.7, "A100": 156.0, "L40S": 183.0, "A10": 62.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 1 iteration: a smoke run (what the tests use on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: cuda when available, else cpu (interpreter / CPU ops)")
    p.add_argument("--impl", default="auto", choices=["auto", "triton", "ops", "both"],
                   help="fused implementation timed: the Triton launchers, torch.ops.lorecomm "
                        "(the dispatcher: CUDA -> Triton if registered, CPU -> C++), or both. "
                        "auto: triton on cuda, both on cpu (ops only if declared)")
    p.add_argument("--shapes", default=None,
                   help="comma list of BxAxB_ (e.g. 1x4096x4096,4x4096x11008); default: "
                        "LLaMA-like 1x4096x4096,4x4096x4096,1x4096x11008,1x11008x4096")
    p.add_argument("--ranks", default=None, help="comma list of r (default 8,32,128)")
    p.add_argument("--k", type=int, default=4, help="sketch size k of score_sketch (default 4)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="gradient (G, out) dtype; state is float32 (default bfloat16)")
    p.add_argument("--layout", default="contig", choices=["contig", "transposed"],
                   help="G and out as contiguous or transposed (bucket-view) matrices")
    p.add_argument("--ops", default="probe_normal,score_paper,score_sketch,range_sketch,project_residual,decompress",
                   help="comma list of ops to run")
    p.add_argument("--precision", default=None, choices=["ieee", "tf32", "tf32x3"],
                   help="tl.dot precision for the Triton kernels (default: the kernels' default, ieee)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 3, quick 1)")
    p.add_argument("--tf32-peak", type=float, default=None,
                   help="tf32 matrix peak in TFLOP/s (default: from the device name)")
    p.add_argument("--json", default=None, help="also write the rows, device, date and commit here")
    return p.parse_args(argv)


def _want_cuda(args):
    import torch
    if args.device == "cuda":
        return True
    return args.device == "auto" and torch.cuda.is_available()


def import_kernels():
    """lorecomm.kernels (setup.py maps the source tree's kernels/ to it)."""
    return importlib.import_module("lorecomm.kernels")  # setup.py maps kernels/ to it


class Timer:
    def __init__(self, device, iters, warmup):
        import torch
        self.torch, self.cuda = torch, device.type == "cuda"
        self.iters, self.warmup = iters, warmup

    def __call__(self, fn):
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def copy_bandwidth(device, nbytes, timer):
    """Measured device copy bandwidth in bytes/s (read + write counted)."""
    import torch
    n = max(1 << 20, nbytes // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * n * 4 / t


def make_inputs(B, a, b, r, k, gdtype, layout, device, seed=0):
    import torch
    # drawn on the device: hundreds of millions of CPU draws per shape would cost more than the timing
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    def mat(x, y, dtype):
        if layout == "transposed":
            return randn(B, y, x).to(dtype).transpose(1, 2)
        return randn(B, x, y).to(dtype)

    G = mat(a, b, gdtype)
    E = randn(B, a, b) * 0.1
    U = torch.linalg.qr(randn(a, a))[0].expand(B, a, a).contiguous()
    P = U[:, :, :r].contiguous()
    R = torch.empty(B, r, b, device=device)
    Rbar = randn(B, r, b)
    Q = randn(B, r, b)  # Lore's warm start
    out = mat(a, b, gdtype)
    keys = torch.randint(0, 2**62, (B,), generator=g, device=device)
    ok = torch.tensor(True, device=device)
    return dict(G=G, E=E, U=U, P=P, R=R, Rbar=Rbar, Q=Q, out=out, keys=keys, ok=ok, k=k)


def min_bytes(op, B, a, b, r, k, gsize):
    """Minimum DRAM traffic of one call (bytes)."""
    f = 4
    if op == "probe_normal":
        return B * a * b * f
    if op == "score_paper":  # read G, E once, U once, write a scores
        return B * (a * b * (gsize + f) + a * a * f + a * f)
    if op == "score_sketch":
        return B * (a * b * (gsize + f) + a * a * f + a * k * f)
    if op == "range_sketch":  # read G, E once, Q (bf16) once, write Y
        return B * (a * b * (gsize + f) + r * b * f + a * r * f)
    if op == "project_residual":  # read G, E, P; write E, R
        return B * (a * b * (gsize + 2 * f) + a * r * f + r * b * f)
    if op == "decompress":  # read P, Rbar; write out
        return B * (a * b * gsize + a * r * f + r * b * f)
    raise ValueError(op)


def unfused(op, x, k, probes):
    """The plain torch sequence the fused kernel replaces (H materialised)."""
    import torch
    G, E, U, P = x["G"], x["E"], x["U"], x["P"]
    if op == "probe_normal":
        return lambda: torch.randn(G.shape, device=G.device)
    if op == "score_paper":
        def f():
            H = G.float() + E
            Z = torch.bmm(U.transpose(1, 2), H)
            return (Z * probes["paper"]).sum(-1)
        return f
    if op == "score_sketch":
        def f():
            H = G.float() + E
            return torch.bmm(U.transpose(1, 2), torch.bmm(H, probes["sketch"]))
        return f
    if op == "range_sketch":
        return lambda: torch.bmm(G.float() + E, x["Q"].transpose(1, 2))
    if op == "project_residual":
        E2 = E.clone()

        def f():
            H = G.float() + E2
            x["R"].copy_(torch.bmm(P.transpose(1, 2), H))
            E2.copy_(H - torch.bmm(P, x["R"]))
        return f
    if op == "decompress":
        return lambda: x["out"].copy_(torch.bmm(P, x["Rbar"]))
    raise ValueError(op)


def fused(op, x, impl, K, precision):
    import torch
    G, E, U, P, keys = x["G"], x["E"], x["U"], x["P"], x["keys"]
    k = x["k"]
    if impl == "ops":
        o = torch.ops.lorecomm
        table = {
            "probe_normal": lambda: o.probe_normal(keys, G.shape[1], G.shape[2]),
            "score_paper": lambda: o.score_paper(G, E, U, keys),
            "score_sketch": lambda: o.score_sketch(G, E, U, keys, k),
            "range_sketch": lambda: o.range_sketch(G, E, x["Q"]),
            "project_residual": lambda: o.project_residual(G, E, P, x["R"], x["ok"]),
            "decompress": lambda: o.decompress(P, x["Rbar"], x["out"]),
        }
        return table[op]
    kw = {} if precision is None else {"precision": precision}
    table = {
        "probe_normal": lambda: K.probe_normal(keys, G.shape[1], G.shape[2]),
        "score_paper": lambda: K.score_paper(G, E, U, keys, **kw),
        "score_sketch": lambda: K.score_sketch(G, E, U, keys, k, **kw),
        "range_sketch": lambda: K.range_sketch(G, E, x["Q"], **kw),
        "project_residual": lambda: K.project_residual(G, E, P, x["R"], x["ok"], **kw),
        "decompress": lambda: K.decompress(P, x["Rbar"], x["out"], **kw),
    }
    return table[op]


def check_result(op, x, impl, K):
    """Max relative error of the fused op against a float64 torch computation (smoke check)."""
    import torch
    G, E, U, P, keys, k = x["G"], x["E"], x["U"], x["P"], x["keys"], x["k"]
    B, a, b = G.shape
    H = G.double() + E.double()
    fn = fused(op, x, impl, K, None)
    if op == "probe_normal":
        return None
    if op == "score_paper":
        V = K.probe_normal(keys, a, b).double() if impl == "triton" else torch.ops.lorecomm.probe_normal(keys, a, b).double()
        ref, got = ((U.double().transpose(1, 2) @ H) * V).sum(-1), fn()
    elif op == "score_sketch":
        S = K.probe_normal(keys, b, k).double() if impl == "triton" else torch.ops.lorecomm.probe_normal(keys, b, k).double()
        ref, got = U.double().transpose(1, 2) @ (H @ S), fn()
    elif op == "range_sketch":
        ref, got = H @ x["Q"].double().transpose(1, 2), fn()
    elif op == "project_residual":
        E0 = E.clone()
        fn()
        ref = P.double().transpose(1, 2) @ H
        got = x["R"]
        eref = H - P.double() @ ref
        e_err = ((E.double() - eref).abs().max() / (eref.abs().max() + 1e-30)).item()
        E.copy_(E0)
        return max(e_err, ((got.double() - ref).abs().max() / (ref.abs().max() + 1e-30)).item())
    else:
        fn()
        ref, got = P.double() @ x["Rbar"].double(), x["out"]
    return ((got.double() - ref).abs().max() / (ref.abs().max() + 1e-30)).item()


def main(argv=None):
    args = parse_args(argv)
    use_cuda = _want_cuda(args)
    if not use_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device")
    K = import_kernels()
    declared = K.ops_declared()
    if use_cuda and declared:
        K.register_cuda_kernels()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    impl = args.impl
    if impl == "auto":
        impl = "triton" if use_cuda else "both"
    impls = ["triton", "ops"] if impl == "both" else [impl]
    if "ops" in impls:
        missing = [o for o in ops if o not in declared]
        if missing:
            msg = f"torch.ops.lorecomm ops not declared (lorecomm._C not built?): {missing}"
            if impl == "ops":
                sys.exit(msg)
            print(f"# note: {msg}; timing the Triton launchers only")
            impls = ["triton"]
    if not use_cuda and "triton" in impls and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("on CPU the Triton launchers need TRITON_INTERPRET=1")

    if args.quick:
        shapes = args.shapes or "2x24x40,1x33x70"
        ranks = args.ranks or "4,16"
        iters, warmup = args.iters or 1, args.warmup or 1
    else:
        shapes = args.shapes or "1x4096x4096,4x4096x4096,1x4096x11008,1x11008x4096"
        ranks = args.ranks or "8,32,128"
        iters, warmup = args.iters or 20, args.warmup if args.warmup is not None else 3
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in shapes.split(",")]
    ranks = [int(v) for v in ranks.split(",")]
    gdtype = getattr(torch, args.dtype)
    gsize = torch.empty((), dtype=gdtype).element_size()
    timer = Timer(device, iters, warmup)

    if use_cuda:
        name = torch.cuda.get_device_name(device)
        peak = args.tf32_peak or next((v for key, v in TF32_PEAK.items() if key in name), None)
        largest = max(min_bytes("project_residual", B, a, b, max(ranks), args.k, gsize) for B, a, b in shapes)
        copy_bw = copy_bandwidth(device, max(largest // 2, 1 << 28), timer)
        claim = True
    else:
        name = "cpu (Triton interpreter" + (" + C++ CPU ops)" if "ops" in impls else ")")
        peak = None
        copy_bw = copy_bandwidth(device, 1 << 22, timer)
        claim = False

    print(f"# lorecomm kernels benchmark: device={name}, date={datetime.date.today()}, "
          f"commit={git_commit()}, torch={torch.__version__}, G dtype={args.dtype}, layout={args.layout}, "
          f"k={args.k}, iters={iters}")
    print(f"# measured copy bandwidth: {copy_bw / 1e9:.1f} GB/s (torch copy, read+write)")
    if not claim:
        print("# CPU run: NO SPEED CLAIM. Timings below are of the Triton interpreter / CPU ops and "
              "only show that the benchmark runs; relerr checks the results.")
    hdr = ("| op | impl | B x a x b | r | min MB | fused ms | GB/s | % copy | unfused ms | speedup "
           "| TFLOP/s | % tf32 peak | relerr |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    rows = []
    for (B, a, b) in shapes:
        for r in ranks:
            if r > a:
                continue
            x = make_inputs(B, a, b, r, args.k, gdtype, args.layout, device)
            probes = {}
            if "score_paper" in ops:
                probes["paper"] = torch.randn(B, a, b, device=device)
            if "score_sketch" in ops:
                probes["sketch"] = torch.randn(B, b, args.k, device=device)
            for op in ops:
                # r only changes project_residual / decompress: time the others once per shape
                if op in ("probe_normal", "score_paper", "score_sketch") and r != next(q for q in ranks if q <= a):
                    continue
                t_unf = timer(unfused(op, x, args.k, probes))
                for im in impls:
                    err = check_result(op, x, im, K)  # a speed of a wrong result is no result
                    t = timer(fused(op, x, im, K, args.precision))
                    nbytes = min_bytes(op, B, a, b, r, args.k, gsize)
                    gbs = nbytes / t / 1e9
                    flops = 2.0 * B * a * a * b if op == "score_paper" else None
                    row = dict(op=op, impl=im, B=B, a=a, b=b, r=r, min_bytes=nbytes, fused_s=t,
                               gbs=gbs, copy_frac=gbs * 1e9 / copy_bw, unfused_s=t_unf,
                               speedup=t_unf / t, tflops=(flops / t / 1e12) if flops else None,
                               peak_frac=(flops / t / 1e12 / peak) if (flops and peak) else None,
                               relerr=err)
                    rows.append(row)
                    tfl = "-" if flops is None else "%.2f" % row["tflops"]
                    pk = "-" if row["peak_frac"] is None else "%.0f%%" % (100 * row["peak_frac"])
                    rr = r if op in ("range_sketch", "project_residual", "decompress") else "-"
                    er = "-" if err is None else "%.1e" % err
                    print(f"| {op} | {im} | {B}x{a}x{b} | {rr} | {nbytes / 1e6:.2f} | {t * 1e3:.3f} "
                          f"| {gbs:.1f} | {100 * row['copy_frac']:.0f}% | {t_unf * 1e3:.3f} "
                          f"| {row['speedup']:.2f}x | {tfl} | {pk} | {er} |", flush=True)
                    if args.json:  # every row as it is measured: a run cut short keeps what it measured
                        with open(args.json, "w") as fh:
                            json.dump(dict(device=name, date=str(datetime.date.today()), commit=git_commit(),
                                           torch=torch.__version__, speed_claim=claim, copy_bandwidth=copy_bw,
                                           tf32_peak=peak, args=vars(args), rows=rows), fh, indent=1)
            del x, probes
    return 0


if __name__ == "__main__":
    sys.exit(main())
