"""Real data that ships with installed software; nothing is downloaded.

- text: the Python standard library's own ``.py`` sources (``sysconfig`` stdlib path,
  ``site-packages`` excluded), byte level (vocabulary 256). Held-out validation split by
  *file* (every ``val_every``-th file in sorted order), so validation text is unseen.
- images: scikit-learn's bundled 8x8 ``digits`` (1797 images, 10 classes).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig

import torch


def _stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                out.append(os.path.join(dirpath, f))
    out.sort()
    return root, out


def load_text(max_train_bytes: int = 4_000_000, max_val_bytes: int = 400_000, val_every: int = 20):
    """Return (train, val, info): uint8 tensors of bytes and a description dict."""
    root, files = _stdlib_files()
    train, val = [], []
    nt = nv = 0
    for i, path in enumerate(files):
        if nt >= max_train_bytes and nv >= max_val_bytes:
            break
        is_val = (i % val_every) == val_every - 1
        if (is_val and nv >= max_val_bytes) or (not is_val and nt >= max_train_bytes):
            continue
        try:
            with open(path, "rb") as fh:
                b = fh.read()
        except OSError:
            continue
        if is_val:
            val.append(b)
            nv += len(b)
        else:
            train.append(b)
            nt += len(b)
    tr = b"".join(train)[:max_train_bytes]
    va = b"".join(val)[:max_val_bytes]
    info = {
        "source": f"Python stdlib sources under {root} (site-packages excluded)",
        "train_bytes": len(tr),
        "val_bytes": len(va),
        "split": f"by file: every {val_every}th file (sorted order) held out",
        "sha1": hashlib.sha1(tr + va).hexdigest()[:12],
    }
    return (torch.frombuffer(bytearray(tr), dtype=torch.uint8).clone(),
            torch.frombuffer(bytearray(va), dtype=torch.uint8).clone(), info)


def lm_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """Random contiguous windows; returns int64 (batch, seq) input ids (labels = inputs)."""
    idx = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([data[i:i + seq] for i in idx.tolist()]).long()


def lm_val_batches(data: torch.Tensor, batch: int, seq: int, n_batches: int):
    """Fixed, evenly spaced validation windows (identical on every rank)."""
    n = n_batches * batch
    starts = torch.linspace(0, data.numel() - seq - 1, n).long().tolist()
    wins = torch.stack([data[s:s + seq] for s in starts]).long()
    return list(wins.split(batch))


def load_digits(test_fraction: float = 0.3, seed: int = 0):
    """Return dict with x_train (N,1,8,8) float32 in [0,1], y_train, x_test, y_test."""
    try:
        from sklearn.datasets import load_digits as _ld
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the digits workloads need scikit-learn "
                           "(pip install -r requirements/extra-bench.txt "
                           "-c requirements/constraints-cpu.txt)") from e
    d = _ld()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def subset_classes(d: dict, classes):
    cls = torch.tensor(list(classes))
    out = {}
    for split in ("train", "test"):
        m = torch.isin(d[f"y_{split}"], cls)
        out[f"x_{split}"] = d[f"x_{split}"][m]
        out[f"y_{split}"] = d[f"y_{split}"][m]
    return out
