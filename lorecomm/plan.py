"""The per-bucket plan: which gradients are compressed, how they are viewed.

A bucket is a flat gradient buffer holding several parameters' gradients at
known element offsets. The plan decides, once per bucket layout, which
parameters travel as low-rank factors (matrices and conv kernels viewed as
``out x (in*kh*kw)``, oriented so the short side ``a`` is projected), groups
same-shape matrices that sit at equally spaced offsets into zero-copy batched
views, and lists the element ranges that stay dense (biases, norms, small or
name-filtered tensors, padding).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

#: parameters whose names contain one of these stay dense by default: the
#: embeddings and output heads the paper keeps dense (torch / Hugging Face and
#: GPT-2 style names); embedding modules are also found by type (CommState.bind)
DEFAULT_DENSE_PATTERNS = ("embed", "lm_head", "wte", "wpe")


@dataclass(frozen=True)
class MatrixSlot:
    """One compressed parameter inside a bucket."""

    param_id: int
    name: str
    offset: int  # element offset of the gradient in the bucket
    m: int
    n: int

    @property
    def transposed(self) -> bool:
        return self.m > self.n

    @property
    def a(self) -> int:
        return min(self.m, self.n)

    @property
    def b(self) -> int:
        return max(self.m, self.n)


@dataclass
class Batch:
    """Same-shape matrices at offsets ``offset0 + i * stride`` in the bucket."""

    slots: list[MatrixSlot]
    rank: int
    stride: int = 0
    #: the state's batched tensors for these matrices (error buffer, basis, ...)
    tensors: dict = field(default_factory=dict)
    #: (B,) int64 parameter ids on the bucket's device (they key the shared draws)
    ids: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def m(self) -> int:
        return self.slots[0].m

    @property
    def n(self) -> int:
        return self.slots[0].n

    @property
    def a(self) -> int:
        return self.slots[0].a

    @property
    def b(self) -> int:
        return self.slots[0].b

    @property
    def transposed(self) -> bool:
        return self.slots[0].transposed

    @property
    def param_ids(self) -> list[int]:
        return [s.param_id for s in self.slots]

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """The batch's gradients in ``buffer`` as a (B, a, b) strided view."""
        first = self.slots[0]
        v = buffer.as_strided(
            (self.size, self.m, self.n),
            (self.stride if self.size > 1 else self.m * self.n, self.n, 1),
            buffer.storage_offset() + first.offset,
        )
        return v.transpose(1, 2) if self.transposed else v


@dataclass
class BucketPlan:
    numel: int
    batches: list[Batch] = field(default_factory=list)
    dense_ranges: list[tuple[int, int]] = field(default_factory=list)
    #: ids of every parameter in the bucket (compressed or dense)
    param_ids: tuple[int, ...] = ()

    @property
    def dense_numel(self) -> int:
        return sum(e - s for s, e in self.dense_ranges)

    @property
    def matrices(self) -> list[MatrixSlot]:
        return [s for b in self.batches for s in b.slots]

    def gather_dense(self, buffer: torch.Tensor, out: torch.Tensor) -> None:
        """Copy the dense ranges of ``buffer`` into ``out`` back to back."""
        pos = 0
        for s, e in self.dense_ranges:
            out[pos:pos + e - s].copy_(buffer[s:e])
            pos += e - s

    def scatter_dense(self, src: torch.Tensor, buffer: torch.Tensor) -> None:
        pos = 0
        for s, e in self.dense_ranges:
            buffer[s:e].copy_(src[pos:pos + e - s])
            pos += e - s


def matrix_shape(shape: Sequence[int]) -> tuple[int, int] | None:
    """2-D view of a parameter (conv kernels as out x in*kh*kw); None for 1-D."""
    if len(shape) < 2:
        return None
    m = int(shape[0])
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return m, n


def compressed_rank(m: int, n: int, rank: int, min_compression_rate: float) -> int | None:
    """The rank an m x n matrix is compressed with, or None where it does not pay.

    r is capped at min(m, n); compress only if max(m, n) * r * rate < m * n.
    """
    r = min(rank, m, n)
    return r if max(m, n) * r * min_compression_rate < m * n else None


def lore_rank(m: int, n: int, rank: int, min_compression_rate: float, wire_bytes: int = 4) -> int | None:
    """Lore's rank for an m x n matrix, or None where it does not pay.

    r is capped at min(m, n); compress only if the bytes sent, wire_bytes * (m + n) * r
    (sketch and factors; a step that does not explore), times the rate stay below what
    dense fp32 DDP would send, 4 * m * n. With an fp32 wire this is torch's PowerSGD rule;
    with bf16 factors Lore compresses at twice PowerSGD's rank exactly the matrices
    PowerSGD compresses.
    """
    r = min(rank, m, n)
    return r if wire_bytes * (m + n) * r * min_compression_rate < 4 * m * n else None


def lore_step_bytes(tensors: Iterable[tuple[Sequence[int], int | None]], wire_bytes: int,
                    used_flags: bool = False, explore: bool = False) -> int:
    """The most bytes Lore sends in a compressed step, for tensors given as
    (shape, rank): wire_bytes * (a + b) * r for an a x b matrix sent as sketch
    and factors (plus one used flag with ``used_flags``), wire_bytes per element
    for a tensor sent dense (rank None). A step that explores sends one sketch
    column fewer per matrix, except at rank 1, where its random direction joins
    the tracked one: with ``explore`` such a matrix counts one more factor row,
    wire_bytes * (a + 2 b)."""
    sent = 0
    for shape, r in tensors:
        if r is None:
            sent += wire_bytes * torch.Size(shape).numel()
        else:
            m, n = matrix_shape(shape)
            extra = max(m, n) if explore and r == 1 and min(m, n) > 1 else 0
            sent += wire_bytes * ((m + n) * r + extra + used_flags)
    return sent


def name_is_dense(name: str, patterns: Sequence[str]) -> bool:
    """A parameter is kept dense when a pattern is a substring or glob of its name."""
    return any(p in name or fnmatch.fnmatchcase(name, p) for p in patterns)


def build_plan(
    numel: int,
    params: Sequence[tuple[int, str, tuple[int, ...], int]],
    rank_for: Callable[[int, int, str, int], int | None],
) -> BucketPlan:
    """Plan one bucket.

    ``params``: (param_id, name, shape, offset) of each gradient in the bucket.
    ``rank_for(m, n, name, param_id)``: the rank to compress an m x n matrix
    with, or None to keep it dense (the rank-selection policy lives in the state).
    """
    slots: list[tuple[MatrixSlot, int]] = []
    covered: list[tuple[int, int]] = []
    for pid, name, shape, offset in params:
        size = 1
        for d in shape:
            size *= int(d)
        if offset < 0 or offset + size > numel:
            raise ValueError(
                f"gradient of {name!r} (offset {offset}, {size} elements) lies outside "
                f"the bucket of {numel} elements")
        mn = matrix_shape(shape)
        if mn is None:
            continue
        r = rank_for(mn[0], mn[1], name, pid)
        if r is None:
            continue
        slots.append((MatrixSlot(pid, name, offset, mn[0], mn[1]), r))
        covered.append((offset, offset + size))

    covered.sort()
    names = {slot.offset: slot.name for slot, _ in slots}
    for (s0, e0), (s1, _) in zip(covered, covered[1:]):
        if s1 < e0:
            raise ValueError(
                f"the gradients of {names[s0]!r} (elements {s0}..{e0}) and {names[s1]!r} (from {s1}) overlap "
                f"in the bucket: check the offsets passed to reduce() (each gradient needs its own range)")

    plan = BucketPlan(numel=numel, param_ids=tuple(pid for pid, _, _, _ in params))
    plan.batches = _batch_same_shapes(slots)
    pos = 0
    for s, e in covered:
        if s > pos:
            plan.dense_ranges.append((pos, s))
        pos = e
    if pos < numel:
        plan.dense_ranges.append((pos, numel))
    return plan


def _batch_same_shapes(slots: list[tuple[MatrixSlot, int]]) -> list[Batch]:
    """Group same (m, n, rank) matrices into runs of equally spaced offsets."""
    groups: dict[tuple[int, int, int], list[MatrixSlot]] = {}
    for slot, r in slots:
        groups.setdefault((slot.m, slot.n, r), []).append(slot)
    batches: list[Batch] = []
    for (m, n, r), members in groups.items():
        members.sort(key=lambda s: s.offset)
        run: list[MatrixSlot] = [members[0]]
        stride = 0
        for s in members[1:]:
            step = s.offset - run[-1].offset
            if len(run) == 1 or step == stride:
                stride = step
                run.append(s)
            else:
                batches.append(Batch(run, r, stride))
                run, stride = [s], 0
        batches.append(Batch(run, r, stride))
    batches.sort(key=lambda bt: bt.slots[0].offset)
    return batches
