"""Helpers shared by the integrations (not a public API)."""
from __future__ import annotations

import inspect
from typing import Iterable, Sequence

import torch
import torch.distributed as dist


def make_state(state, config: dict, process_group, default_dense_patterns: Sequence[str] | None = None):
    """``state`` as given, or the state of ``config["compressor"]`` (default "lore",
    see ``lorecomm.COMPRESSORS``) built from the other keywords on ``process_group``."""
    from lorecomm import COMPRESSORS

    if state is not None:
        if config:
            raise ValueError(f"pass either state= or config keywords, not both (got state= and "
                             f"{', '.join(sorted(config))}): configure the state itself, or drop state=")
        return state
    config = dict(config)
    name = config.pop("compressor", "lore")
    if name not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {', '.join(map(repr, COMPRESSORS))}; got {name!r}")
    takes = [k for k in inspect.signature(COMPRESSORS[name]).parameters if k not in ("self", "kwargs")]
    unknown = sorted(set(config) - set(takes))
    if unknown:
        raise ValueError(f"compressor={name!r} ({COMPRESSORS[name].__name__}) takes no {', '.join(unknown)}; "
                         f"it takes {', '.join(takes)}")
    config.setdefault("process_group", process_group)
    # the stack's embedding / head names: dense for the paper's GreedyLore and the baselines; Lore
    # compresses every matrix by default, as in plain DDP
    if default_dense_patterns is not None and name not in ("dense", "lore"):
        config.setdefault("dense_name_patterns", tuple(default_dense_patterns))
    return COMPRESSORS[name](**config)


def adopt_grad_scaler(state, scaler) -> None:
    """The stack scales the loss (fp16 mixed precision): give the state its GradScaler, unless it
    has one, so buckets are compressed in unscaled units (error buffers never mix loss scales)."""
    if scaler is not None and state.grad_scaler is None:
        state.grad_scaler = scaler


def check_group(state, group, where: str) -> None:
    """The state must reduce over the same ranks as the stack's data-parallel group."""
    sgroup = state.process_group if state.process_group is not None else dist.group.WORLD
    if group is None:
        group = dist.group.WORLD
    if sgroup is group:
        return
    same = dist.get_world_size(sgroup) == dist.get_world_size(group) and (
        dist.get_process_group_ranks(sgroup) == dist.get_process_group_ranks(group))
    if not same:
        raise ValueError(
            f"the lorecomm state's process group (ranks {dist.get_process_group_ranks(sgroup)}) is not "
            f"{where}'s data-parallel group (ranks {dist.get_process_group_ranks(group)}); build the state "
            f"with process_group=<that group> or let the integration build it")


def offsets_in(buffer: torch.Tensor, grads: Iterable[torch.Tensor]) -> list[int]:
    """Element offsets of gradient views inside a flat buffer (checked)."""
    base, esize, n = buffer.data_ptr(), buffer.element_size(), buffer.numel()
    out = []
    for g in grads:
        delta = g.data_ptr() - base
        if g.dtype != buffer.dtype or delta % esize or not 0 <= delta // esize <= n - g.numel():
            raise RuntimeError("a gradient is not a view of the bucket buffer it belongs to")
        out.append(delta // esize)
    return out
