#!/usr/bin/env python
"""Open-loop compressor comparison on one recorded gradient stream (research tool).

Trains the LM densely on 2 simulated ranks, records both ranks' gradients of a few
matrices for ``--steps`` steps after ``--skip`` warm-up steps, then feeds the *same*
stream to every compressor (so the comparison has no training noise) and reports,
averaged over the stream:
  lag   = ||mean_i E_i||^2 / ||mean_i G_i||^2   (the averaged gradient not yet applied)
  miss  = ||out - mean_i H_i||^2 / ||mean_i H_i||^2 (what this step's output misses of
          the error-corrected mean)
Lower is better for both. Bytes per step are counted per method on the same matrices.

    python bench/research/open_loop.py --methods "psgd:8,sim-lore:16:explore=0,sim-lore:16"
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402

from convergence.tasks import lr_at, make_optimizer, make_task  # noqa: E402


def record(task, steps, skip, names_wanted, N=2, seed=0):
    torch.manual_seed(seed)
    model = task.build_model()
    named = [(n, p) for n, p in model.named_parameters() if any(w in n for w in names_wanted)]
    params = list(model.parameters())
    opt = make_optimizer(params, "adamw", 3e-3)
    stream = []
    total = skip + steps
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, 160, 3e-3)
        grads = []
        for r in range(N):
            model.zero_grad(set_to_none=True)
            task.loss(model, task.train_batch(r, N, step)).backward()
            grads.append([p.grad.detach().clone() for p in params])
        if step >= skip:
            ids = [i for i, (n, p) in enumerate(model.named_parameters()) if any(w in n for w in names_wanted)]
            stream.append([[grads[r][i].double() for i in ids] for r in range(N)])
        for p, *gs in zip(params, *grads):
            p.grad = sum(gs) / N
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return [(n, tuple(p.shape)) for n, p in named], stream


def _E(comp, i, p):
    """rank i's error buffer of parameter p (simulate.py's lists or proto.py's dicts), or None."""
    E = getattr(comp, "E", None)
    if isinstance(E, list):
        return E[i][p]
    if isinstance(E, dict):
        return E.get((i, p))
    return None


def _unorient(comp, p, e, shape):
    return comp._unoriented(p, e) if hasattr(comp, "_unoriented") else comp.unorient(p, e)


def evaluate(make_comp, shapes, stream):
    comp = make_comp(shapes)
    lag = miss = 0.0
    for grads in stream:
        N = len(grads)
        E_before = [[None if _E(comp, i, p) is None else _E(comp, i, p).clone() for p in range(len(shapes))]
                    for i in range(N)]
        out = comp.step(grads)
        for p in range(len(shapes)):
            gbar = sum(grads[i][p] for i in range(N)) / N
            # error-corrected mean (what an exact compressor would have output)
            hbar = gbar.clone()
            if E_before[0][p] is not None:
                e = sum(E_before[i][p] for i in range(N)) / N
                hbar = hbar + _unorient(comp, p, e, gbar.shape).reshape(gbar.shape)
            miss += float((out[p].reshape(gbar.shape) - hbar).square().sum() / hbar.square().sum())
            if _E(comp, 0, p) is not None:
                ebar = sum(_E(comp, i, p) for i in range(N)) / N
                lag += float(ebar.square().sum() / gbar.square().sum())
    n = len(stream) * len(shapes)
    return lag / n, miss / n, comp.bytes_sent / len(stream)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="psgd:8,sim-lore:16:explore=0,sim-lore:16")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=30)
    ap.add_argument("--names", default="layers.1.self_attn.q_proj,layers.1.self_attn.o_proj,layers.1.mlp.up_proj,"
                                        "layers.1.mlp.down_proj")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from proto import make
    task = make_task({"task": "lm", "preset": "base", "seq": 64, "batch": 8, "seed": 0})
    shapes, stream = record(task, args.steps, args.skip, args.names.split(","))
    print(f"recorded {len(stream)} steps of {len(shapes)} matrices: {shapes}")
    for m in args.methods.split(","):
        lag, miss, b = evaluate(lambda s, m=m: make(m, 2, s, 0, 0), shapes, stream)
        print(f"{m:34s} lag {lag:.6f}  miss {miss:.6f}  {b / 1e3:.1f} KB/step", flush=True)


if __name__ == "__main__":
    main()
