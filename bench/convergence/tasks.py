"""Workload definitions shared by the real-rank (Gloo) runner and the simulation runner.

A task is built from a plain, picklable dict ``spec`` (so it can cross process boundaries):
``spec["task"]`` in {"lm", "digits", "digits-finetune"}.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from . import data as D
from . import models as M


class LMTask:
    """Byte-level LLaMA-architecture LM on stdlib sources, held-out validation by file."""

    def __init__(self, spec):
        self.spec = spec
        self.train, self.val, self.data_info = D.load_text(spec.get("train_bytes", 4_000_000),
                                                           spec.get("val_bytes", 400_000))
        self.seq = spec.get("seq", 128)
        self.batch = spec.get("batch", 8)
        self.val_batches = D.lm_val_batches(self.val, self.batch, self.seq, spec.get("val_batches", 8))
        self.model_kind = None

    def build_model(self):
        m, kind = M.make_lm(self.spec.get("preset", "small"), self.seq, seed=self.spec.get("seed", 0),
                            force_fallback=self.spec.get("force_fallback", False))
        self.model_kind = kind
        return m

    def train_batch(self, rank, world, step):
        g = torch.Generator().manual_seed(1_000_003 * (self.spec.get("seed", 0) + 1) + 7919 * step + rank)
        return D.lm_batch(self.train, self.batch, self.seq, g)

    def loss(self, model, batch):
        return model(batch)

    @torch.no_grad()
    def evaluate(self, model):
        model.eval()
        ls = [float(model(b)) for b in self.val_batches]
        model.train()
        return {"val_loss": sum(ls) / len(ls)}


class DigitsTask:
    """Residual CNN on sklearn digits. ``digits-finetune``: start from a model pre-trained
    (dense, single process) on classes ``pre_classes`` and fine-tune on ``ft_classes``."""

    def __init__(self, spec):
        self.spec = spec
        d = D.load_digits(seed=0)
        if spec["task"] == "digits-finetune":
            d = D.subset_classes(d, spec.get("ft_classes", range(5, 10)))
        self.d = d
        self.batch = spec.get("batch", 32)
        self.model_kind = f"ResNetDigits(width={spec.get('width', 32)})"
        self.data_info = {"source": "sklearn.datasets.load_digits (bundled)",
                          "train": int(len(d["y_train"])), "test": int(len(d["y_test"]))}

    def build_model(self):
        torch.manual_seed(self.spec.get("seed", 0))
        m = M.ResNetDigits(self.spec.get("width", 32))
        if self.spec["task"] == "digits-finetune":
            sd = torch.load(self.spec["pretrained"], map_location="cpu")
            m.load_state_dict(sd)
            torch.manual_seed(self.spec.get("seed", 0) + 1)
            m.fc.reset_parameters()  # new head for the new classes
        return m

    def train_batch(self, rank, world, step):
        g = torch.Generator().manual_seed(1_000_003 * (self.spec.get("seed", 0) + 1) + 7919 * step + rank)
        idx = torch.randint(0, len(self.d["y_train"]), (self.batch,), generator=g)
        x = self.d["x_train"][idx]
        # light augmentation: random 1-pixel shifts
        sh = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=sh, dims=(2, 3))
        return x, self.d["y_train"][idx]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model):
        model.eval()
        logits = model(self.d["x_test"])
        model.train()
        y = self.d["y_test"]
        return {"val_loss": float(F.cross_entropy(logits, y)),
                "val_acc": float((logits.argmax(1) == y).float().mean())}


def make_task(spec):
    if spec["task"] == "lm":
        return LMTask(spec)
    if spec["task"] in ("digits", "digits-finetune"):
        return DigitsTask(spec)
    raise ValueError(spec["task"])


def make_optimizer(params, opt: str, lr: float, weight_decay: float = 0.0):
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    if opt == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(opt)


def lr_at(step, total, base, warmup_frac=0.05):
    """Linear warm-up then cosine decay to 10% (same schedule for every method)."""
    w = max(1, int(warmup_frac * total))
    if step < w:
        return base * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def pretrain_digits(path, classes=range(5), steps=300, width=32, seed=0, lr=2e-3):
    """Dense single-process pre-training on a subset of classes (for the fine-tuning task)."""
    if os.path.exists(path):
        return path
    d = D.subset_classes(D.load_digits(seed=0), classes)
    torch.manual_seed(seed)
    m = M.ResNetDigits(width)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        idx = torch.randint(0, len(d["y_train"]), (64,), generator=g)
        loss = F.cross_entropy(m(d["x_train"][idx]), d["y_train"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    torch.save(m.state_dict(), tmp)
    os.replace(tmp, path)
    return path
