#!/usr/bin/env python
"""Research harness: train a bench/convergence task with N *simulated* ranks in one process.

Each step computes every simulated rank's gradient on its own batch (the same data stream as
the real-rank runner), hands the per-rank gradients to a compressor with ``step(grads) ->
averaged grads`` and ``bytes_sent`` (per rank, cumulative), applies the result, clips and
steps the optimizer. Used to prototype compressors before they go into the engine; every
number it prints is measured in the run that prints it.

    python bench/research/sim_train.py --task lm --methods dense,psgd:8,lore:16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402

from convergence.tasks import lr_at, make_optimizer, make_task  # noqa: E402

SPECS = {
    "lm": ({"task": "lm", "preset": "base", "seq": 64, "batch": 8},
           dict(steps=160, start_step=30, lr={"adamw": 3e-3, "sgdm": 0.2}, clip=1.0)),
    "digits": ({"task": "digits", "width": 16, "batch": 32},
               dict(steps=200, start_step=20, lr={"adamw": 3e-3, "sgdm": 0.05}, clip=None)),
    "ft": ({"task": "digits-finetune", "width": 16, "batch": 32},
           dict(steps=100, start_step=10, lr={"adamw": 2e-3, "sgdm": 0.05}, clip=None)),
}


def train(task, make_comp, N, steps, start_step, opt_name, lr, clip, seed=0, log=None):
    torch.manual_seed(seed)
    model = task.build_model()
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    comp = make_comp([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    opt = make_optimizer(params, opt_name, lr)
    losses = []
    t_comp = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        grads, ls = [], 0.0
        for r in range(N):
            model.zero_grad(set_to_none=True)
            loss = task.loss(model, task.train_batch(r, N, step))
            loss.backward()
            grads.append([p.grad.detach().clone() for p in params])
            ls += float(loss) / N
        t0 = time.perf_counter()
        avg = comp.step(grads)
        t_comp += time.perf_counter() - t0
        for p, g in zip(params, avg):
            p.grad = g.to(p.dtype).reshape(p.shape)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(ls)
        if log and (step + 1) % 40 == 0:
            log(f"  step {step + 1}: loss {ls:.4f}")
    ev = task.evaluate(model)
    return {"train": sum(losses[-10:]) / 10, **ev, "bytes_per_step": comp.bytes_sent / steps,
            "comp_s": t_comp, "names": names}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="lm", choices=sorted(SPECS))
    ap.add_argument("--opt", default="adamw", choices=("adamw", "sgdm"))
    ap.add_argument("--methods", default="dense,psgd:8")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; results averaged")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from proto import make as make_method
    spec, cfg = SPECS[args.task]
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.task == "ft":
        from convergence.tasks import pretrain_digits
        spec["pretrained"] = pretrain_digits(os.path.join(HERE, "..", "results", "tmp", "digits_pre_w16.pt"),
                                             steps=300, width=16)
    steps = args.steps or cfg["steps"]
    start = cfg["start_step"] if args.steps is None else max(2, steps // 5)
    torch.set_num_threads(2)
    tasks = {s: make_task(dict(spec, seed=s)) for s in seeds}
    rows = []
    for m in args.methods.split(","):
        t0 = time.time()
        per = []
        for s in seeds:
            res = train(tasks[s], lambda params, m=m, s=s: make_method(m, args.world, params, start, s), args.world,
                        steps, start, args.opt, cfg["lr"][args.opt], cfg["clip"], seed=s)
            per.append(res)
        res = {k: sum(r[k] for r in per) / len(per) for k in per[0] if k != "names"}
        res["vals"] = [r["val_loss"] for r in per]
        res["method"] = m
        res["wall"] = time.time() - t0
        rows.append(res)
        acc = f" acc {100 * res['val_acc']:.1f}%" if "val_acc" in res else ""
        vals = " ".join(f"{v:.3f}" for v in res["vals"])
        print(f"{args.task}/{args.opt} {m:34s} train {res['train']:.4f} val {res['val_loss']:.4f}{acc} [{vals}] "
              f"{res['bytes_per_step'] / 1e3:8.1f} KB/step comp {res['comp_s']:.1f}s wall {res['wall']:.0f}s",
              flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump([{k: v for k, v in r.items() if k != "names"} for r in rows], fh, indent=1)


if __name__ == "__main__":
    main()
