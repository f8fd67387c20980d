#!/usr/bin/env python
"""Research harness: the LM of bench/results/convergence.md on 2 real Gloo ranks, a few methods
replicated over the run's own seed (the compressors' random streams; data order and
initialisation stay those of the spec's seed), to tell a difference from one run's noise.

Each method is ``name:key=value:...`` on top of convergence.md's LM settings (160 steps, 30
dense warm-up steps, clip 1.0), with the keys of bench/convergence/methods.py: ``rank``
(PowerSGD's; Lore's when ``lore_rank`` is absent is the largest within PowerSGD ``rank``'s
bytes), ``lore_rank``, ``explore``, ``wire`` (a torch dtype name). Prints every run's val loss
and, per method, the mean over the seeds:

    python bench/research/replicates.py --opt adamw --seeds 0,1,2,3 \\
        --methods "powersgd:rank=8,lore:rank=8:lore_rank=16,lore:rank=8:lore_rank=8:wire=float32"
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402

from convergence.ddp_runner import run_ddp  # noqa: E402
from convergence.methods import ALL_METHODS  # noqa: E402
from convergence.run_all import LR, configs  # noqa: E402

CFG = configs(quick=False)
LM = dict(CFG["lm"], clip=1.0)  # convergence.md's LM runs (clipped there too)
OPTS = sorted(opt for kind, opt in LR if kind == "lm")
KEYS = {"rank": int, "lore_rank": int, "explore": float, "wire": str}


def parse_method(text):
    name, *kvs = text.split(":")
    if name not in ALL_METHODS:
        raise SystemExit(f"--methods: unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")
    run = dict(method=name)
    for kv in kvs:
        k, sep, v = kv.partition("=")
        if not sep or k not in KEYS:
            raise SystemExit(f"--methods: {kv!r} in {text!r} is not key=value with a key of {', '.join(KEYS)}")
        run[k] = KEYS[k](v)
    if "wire" in run and not isinstance(getattr(torch, run["wire"], None), torch.dtype):
        raise SystemExit(f"--methods: wire={run['wire']!r} in {text!r} is not a torch dtype (e.g. float32, bfloat16)")
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", required=True, help="comma-separated name:key=value:... (see above)")
    ap.add_argument("--opt", choices=OPTS, default="adamw")
    ap.add_argument("--seeds", default="0,1,2,3", help="the runs' own seeds")
    ap.add_argument("--data-seed", type=int, default=0, help="the spec's seed: data order and initialisation")
    ap.add_argument("--out", default="/tmp/lorecomm_replicates.json", help="raw results (JSON)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [parse_method(m) for m in args.methods.split(",")]
    spec = dict(CFG["lm_spec"], seed=args.data_seed, desc="replicates")
    runs = [dict(LM, **m, opt=args.opt, lr=LR[("lm", args.opt)], seed=s, label=f"{text}/{args.opt}")
            for text, m in zip(args.methods.split(","), methods) for s in seeds]
    res = run_ddp(spec, runs, 2, args.out, progress=True)
    per = {}
    for r in res["runs"]:
        v = r["evals"][-1]["val_loss"]
        per.setdefault(r["label"], []).append(v)
        print(f"{r['label']} seed {r['seed']}: val {v:.4f}, {r['bytes_per_step'] / 1024:.1f} KB/step", flush=True)
    for label, vs in per.items():
        print(f"{label}: mean {sum(vs) / len(vs):.4f} over seeds {args.seeds} ({', '.join(f'{v:.4f}' for v in vs)})")


if __name__ == "__main__":
    main()
