"""Tables and plots shared by bench/compare.py and bench/convergence/run_all.py."""
from __future__ import annotations

import math
import os


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0


def smooth(xs, k=10):
    out, s = [], 0.0
    q = []
    for x in xs:
        q.append(x)
        s += x
        if len(q) > k:
            s -= q.pop(0)
        out.append(s / len(q))
    return out


def final_train_loss(run, k=10):
    ls = run["losses"]
    return sum(ls[-k:]) / len(ls[-k:])


def ddp_rows(results):
    """Rows (dicts) of the per-run table of a run_ddp result."""
    rows = []
    for r in results["runs"]:
        ev = r["evals"][-1]
        row = {"run": r["label"], "opt": r["opt"], "train loss": final_train_loss(r),
               "val loss": ev["val_loss"]}
        if "val_acc" in ev:
            row["val acc"] = ev["val_acc"]
        cb, st = r["cum_bytes"], r.get("start_step", 0)
        after = None
        if 0 < st < len(cb):
            dense_step = cb[0]  # step 1 is dense for every method here
            after = dense_step * (len(cb) - st) / max(1, cb[-1] - cb[st - 1])
        row.update({"bytes/step": r["bytes_per_step"], "compression": r["compression_ratio"],
                    "compression after warm-up": after,
                    "time/step (s)": r["time_per_step"], "wall (s)": r.get("wall_s", float("nan"))})
        rows.append(row)
    return rows


def _cell(k, v):
    if isinstance(v, str):
        return v
    if v is None:
        return "-"
    if k == "bytes/step":
        return fmt_bytes(v)
    if k.startswith("compression"):
        return f"{v:.2f}x"
    if k == "val acc":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown_table(rows, cols=None):
    if not rows:
        return "(no rows)\n"
    cols = cols or list(rows[0].keys())
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_cell(c, r.get(c)) for c in cols) + " |")
    return "\n".join(out) + "\n"


def text_table(rows, cols=None):
    cols = cols or list(rows[0].keys())
    cells = [[_cell(c, r.get(c)) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w[i]) for i, c in enumerate(cols))
    out = [line, "-" * len(line)]
    for x in cells:
        out.append("  ".join(v.ljust(w[i]) for i, v in enumerate(x)))
    return "\n".join(out)


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_ddp(results, path, title):
    """Loss vs step and loss vs bytes sent (train loss, smoothed; val loss as markers)."""
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # one colour per method, one line style per optimizer: every run stays distinguishable
    methods = list(dict.fromkeys(r["label"].split("/")[0] for r in results["runs"]))
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    styles = {"adamw": "-", "sgdm": "--"}
    for r in results["runs"]:
        method, _, opt = r["label"].partition("/")
        color = palette(methods.index(method) % palette.N)
        ls = styles.get(opt, ":")
        sm = smooth(r["losses"], 10)
        steps = list(range(1, len(sm) + 1))
        axes[0].plot(steps, sm, label=r["label"], lw=1.2, color=color, ls=ls)
        axes[1].plot([b / 1e6 for b in r["cum_bytes"]], sm, color=color, ls=ls, lw=1.2, label=r["label"])
        es = [e["step"] for e in r["evals"]]
        axes[0].plot(es, [e["val_loss"] for e in r["evals"]], "o", ms=3, color=color)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("train loss (10-step mean); dots: validation")
    axes[1].set_xlabel("MB sent per rank (cumulative)")
    axes[1].set_ylabel("train loss (10-step mean)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_quadratics(q, path):
    plt = _plt()
    if plt is None:
        return None
    kinds = list(q["results"])
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 8))
    for j, kind in enumerate(kinds):
        for m, r in q["results"][kind]["methods"].items():
            c = r["curve"]
            line, = axes[0, j].plot(range(len(c)), c, label=f"{m} (lr={r['lr']:g})", lw=1.1)
            axes[1, j].plot([t * r["bytes_per_step"] / 1e3 for t in range(len(c))], c, color=line.get_color(), lw=1.1)
        for ax in axes[:, j]:
            ax.set_yscale("log")
            ax.axhline(q["config"]["target"], color="k", ls=":", lw=0.8)
            ax.grid(alpha=0.3)
        axes[0, j].set_title(f"{kind} spectrum")
        axes[0, j].set_xlabel("iteration")
        axes[1, j].set_xlabel("KB sent per rank")
        axes[0, j].set_ylabel("f(W) / f(W0)")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedup(s, path):
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    Ns = s["config"]["Ns"]
    for m, res in s["results"].items():
        it = [res[str(N)]["iters"] for N in Ns]
        ax.plot(Ns, [float("nan") if v is None else v for v in it], "o-", label=m)
    base = s["results"].get("dense", next(iter(s["results"].values())))[str(Ns[0])]["iters"]
    if base:
        ax.plot(Ns, [base * Ns[0] / N for N in Ns], "k:", label="ideal 1/N (from dense N=1)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks N")
    ax.set_ylabel("steps to target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontier_points(results):
    """(method, opt) -> sorted [(bytes per step after warm-up, final val loss, rank, run)] of a frontier run."""
    pts = {}
    for r in results["runs"]:
        cb, st = r["cum_bytes"], r.get("start_step", 0)
        after = (cb[-1] - cb[st - 1]) / max(1, len(cb) - st) if 0 < st < len(cb) else r["bytes_per_step"]
        key = (r["method"], r["opt"])
        rk = r.get("lore_rank") if r["method"] == "lore" else r.get("rank")
        pts.setdefault(key, []).append((after, r["evals"][-1]["val_loss"], rk, r))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in pts.items()}


def plot_frontier(workloads, path):
    """Validation loss vs bytes per step after warm-up, per workload (columns) and optimizer (rows)."""
    plt = _plt()
    if plt is None:
        return None
    keys = [k for k in ("lm", "digits", "ft") if k in workloads]
    opts = sorted({r["opt"] for k in keys for r in workloads[k]["runs"]})
    fig, axes = plt.subplots(len(opts), len(keys), figsize=(5.2 * len(keys), 4.2 * len(opts)), squeeze=False)
    colors = {"powersgd": "tab:orange", "lore": "tab:blue", "greedylore": "tab:green", "randk": "tab:purple"}
    for j, k in enumerate(keys):
        pts = frontier_points(workloads[k])
        for i, opt in enumerate(opts):
            ax = axes[i, j]
            for (m, o), ps in pts.items():
                if o != opt:
                    continue
                if m == "dense":
                    ax.axhline(ps[0][1], color="k", ls=":", lw=1, label="dense")
                    continue
                ax.plot([p[0] / 1e3 for p in ps], [p[1] for p in ps], "o-", color=colors.get(m), label=m, lw=1.2,
                        ms=4)
                for b, v, rk, _ in ps:
                    ax.annotate(f"r{rk}", (b / 1e3, v), fontsize=6, xytext=(2, 2), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel("KB sent per rank per step after warm-up (everything counted)")
            ax.set_ylabel("validation loss")
            ax.set_title(f"{k} / {opt}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
