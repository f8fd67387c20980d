#!/usr/bin/env python
"""lorecomm's main job: dense all-reduce vs torch PowerSGD vs Lore vs GreedyLore on a small LM.

Two (``--world-size``) local Gloo ranks (torch.multiprocessing, 127.0.0.1) train a small
LLaMA-architecture causal LM (``transformers`` LlamaForCausalLM built from a config, random
init; a pure-torch LLaMA-like fallback if transformers is missing, and the table says so)
byte-level on the Python standard library's own sources, with a held-out validation split
(by file). Each method trains from the same seed on the same data stream with the same
optimizer (AdamW, warm-up + cosine schedule, clip 1.0):

- ``dense``: plain DDP all-reduce (fp32);
- ``powersgd``: torch's ``powerSGD_hook``, unmodified, rank ``--rank``, error feedback and warm
  start on. It launches a collective from a Future callback, which on Gloo aborts with two or
  more buckets, so DDP is built with ``bucket_cap_mb`` above the model size: ONE bucket (all
  methods use the same single bucket). Its bytes are counted by mirroring torch's rule;
- ``lore``: ``lorecomm.register(ddp, rank=..., start_step=...)``, lorecomm's default
  compressor at the largest rank whose bytes per step fit in PowerSGD's (bf16 factors: about
  twice PowerSGD's rank; ``--lore-rank`` sets it);
- ``greedylore``: ``lorecomm.register(ddp, compressor="greedylore", rank=..., start_step=...,
  update_interval=...)``, the paper's algorithm.

Scaled to the short run: compression (PowerSGD and GreedyLore alike) starts after
``--start-step`` dense steps (default 20% of ``--steps``; the paper uses 1000 of its LLaMA run)
and GreedyLore refreshes its basis every ``--update-interval`` steps (default steps/4; paper
200). Prints a table (final train loss = mean of the last 10 steps, validation loss,
bytes/step, compression ratio, time/step) and writes loss-vs-step and loss-vs-bytes as PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

MAIN_METHODS = ("dense", "powersgd", "lore", "greedylore")


def build_parser():
    from convergence.methods import ALL_METHODS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods available: " + ", ".join(ALL_METHODS))
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per method (default 150)")
    p.add_argument("--methods", default=",".join(MAIN_METHODS),
                   help="comma-separated methods (default dense,powersgd,lore,greedylore)")
    p.add_argument("--world-size", type=int, default=2, help="local Gloo ranks (default 2)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "compare"),
                   help="output prefix: writes OUT.png (plot) and OUT.json (all numbers); "
                        "default bench/results/compare")
    p.add_argument("--rank", type=int, default=8, help="PowerSGD / GreedyLore rank r (default 8)")
    p.add_argument("--lore-rank", type=int, default=None, help="Lore's rank (default: the largest whose bytes per step fit in PowerSGD r's, about 2 r)")
    p.add_argument("--start-step", type=int, default=None, help="dense warm-up steps (default steps/5)")
    p.add_argument("--update-interval", type=int, default=None, help="GreedyLore tau (default steps/4)")
    p.add_argument("--optimizer", choices=("adamw", "sgdm"), default="adamw")
    p.add_argument("--lr", type=float, default=None, help="default 3e-3 (adamw) / 0.1 (sgdm)")
    p.add_argument("--preset", default="small", help="model size: tiny | small | base (default small)")
    p.add_argument("--seq", type=int, default=128, help="sequence length in bytes (default 128)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from convergence.methods import ALL_METHODS
    from convergence.models import LM_PRESETS
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:  # before any rank trains
        parser.error(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(ALL_METHODS)}")
    if args.preset not in LM_PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose from {', '.join(LM_PRESETS)}")
    from convergence.ddp_runner import run_ddp
    from convergence.report import plot_ddp, text_table, ddp_rows
    start = args.start_step if args.start_step is not None else max(2, args.steps // 5)
    tau = args.update_interval if args.update_interval is not None else max(1, args.steps // 4)
    lr = args.lr if args.lr is not None else (3e-3 if args.optimizer == "adamw" else 0.1)
    spec = {"task": "lm", "preset": args.preset, "seq": args.seq, "batch": args.batch, "seed": args.seed,
            "desc": "compare"}
    base = dict(opt=args.optimizer, lr=lr, steps=args.steps, eval_every=max(1, args.steps // 5),
                rank=args.rank, lore_rank=args.lore_rank, start_step=start, update_interval=tau, seed=args.seed,
                clip=1.0)
    runs = [dict(base, method=m, label=m) for m in methods]
    print(f"lorecomm compare: {len(runs)} methods x {args.steps} steps on {args.world_size} Gloo ranks; "
          f"rank {args.rank} (Lore {args.lore_rank or f'at PowerSGD r={args.rank} bytes'}), compression from step {start + 1}, "
          f"GreedyLore tau {tau}", flush=True)
    t0 = time.time()
    res = run_ddp(spec, runs, args.world_size, args.out + ".json", progress=not args.no_progress)
    wall = time.time() - t0
    r0 = res["runs"][0]
    print(f"\nmodel: {res['model']}, {r0['params'] / 1e6:.2f}M parameters; data: {res['data']['source']}, "
          f"{res['data']['train_bytes'] / 1e6:.1f} MB train / {res['data']['val_bytes'] / 1e6:.2f} MB held-out val "
          f"({res['data']['split']})")
    if any(r["method"] == "powersgd" for r in res["runs"]):
        print("torch PowerSGD: single DDP bucket (bucket_cap_mb > model size), so it runs on Gloo")
    print()
    print(text_table(ddp_rows(res)))
    png = plot_ddp(res, args.out + ".png",
                   f"{res['model']} byte-level LM on stdlib text, {args.world_size} Gloo ranks, {args.optimizer}")
    print(f"\nwall time {wall:.0f}s; numbers: {args.out}.json" + (f"; plot: {png}" if png else
                                                                  " (matplotlib missing: no plot)"))
    return res


if __name__ == "__main__":
    main()
