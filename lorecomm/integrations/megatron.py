"""lorecomm (Lore by default, or any lorecomm state) in megatron-core's ``DistributedDataParallel``.

Usage::

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from lorecomm.integrations import megatron as lore_megatron

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=True), model)
    state = lore_megatron.register(ddp, rank=16, start_step=1000)   # compressor="greedylore": the paper's
    # train as usual: forward/backward, ddp.finish_grad_sync() (finalize_model_grads does it), optimizer.step()

How it plugs in: megatron-core launches each bucket group's gradient
communication in ``_ParamAndGradBucketGroup.start_grad_sync`` (from the
backward hooks when ``overlap_grad_reduce=True``, from ``finish_grad_sync``
otherwise) and completes it with ``grad_reduce_handle.wait()`` in
``finish_grad_sync``. ``register`` replaces ``start_grad_sync`` on each bucket
group *instance* with one that runs ``state.reduce_async`` on every bucket's
``grad_data`` (the bucket's parameters, their ``main_grad`` offsets) and
stores a handle whose ``wait()`` completes the reduction; the stock
``finish_grad_sync`` is unchanged and drives it, so both overlap settings,
``no_sync`` gradient accumulation and the first-batch special case behave as
in megatron-core. The last bucket reduced in a step passes ``is_last=True``
(the step counter advances once per optimizer step).

Scaling: megatron pre-multiplies each bucket by its
``gradient_scaling_factor`` f and then sums (``average_in_collective=False``,
f = 1/N) or averages (``average_in_collective=True``). lorecomm averages the
unscaled local gradients (so its error-feedback buffers hold gradients, not
scaled gradients) and then multiplies by f*N (sum) or f (average): the same
result as megatron's own collective.

Distributed optimizer (``use_distributed_optimizer=True``): megatron would
reduce-scatter each bucket; every rank still holds its whole local bucket
in ``grad_data`` before that, so lorecomm all-reduces the low-rank factors
and reconstructs the whole averaged bucket; the distributed optimizer then
reads this rank's shard, which holds what the reduce-scatter would have
written (the factors are all-reduced, each rank decompresses; dense and
refresh steps cost an all-reduce instead of a reduce-scatter).

Not supported (refused at ``register`` with the reason):
``num_distributed_optimizer_instances > 1`` and expert-parallel (MoE) bucket
groups, which reduce over other process groups than the dense ones.

CPU-only machines: megatron-core allocates its grad buffers on
``torch.cuda.current_device()``; call :func:`cpu_shim` before building the
DDP model (it makes that call answer ``"cpu"`` while CUDA is unavailable).
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist

from ._common import check_group, make_state, offsets_in

__all__ = ["register", "cpu_shim", "MEGATRON_DENSE_PATTERNS"]

#: megatron-core's GPT/BERT names for the embedding and the output head,
#: which the paper keeps dense (plus the default Hugging Face name)
MEGATRON_DENSE_PATTERNS = ("embed", "output_layer", "lm_head")


def cpu_shim() -> None:
    """Let megatron-core build its DDP buffers on a CPU-only machine.

    megatron-core calls ``torch.cuda.current_device()`` to place its
    parameter/gradient buffers. With no CUDA device this makes that function
    return ``"cpu"`` (a valid ``device=`` argument). Idempotent; does nothing
    when CUDA is available. Process-wide: call it once, before
    ``DistributedDataParallel(...)`` (and before
    ``parallel_state.initialize_model_parallel`` for safety).
    """
    if torch.cuda.is_available() or getattr(torch.cuda.current_device, "_lorecomm_cpu_shim", False):
        return

    def current_device():
        return "cpu"

    current_device._lorecomm_cpu_shim = True
    torch.cuda.current_device = current_device


class _Handle:
    """What megatron stores in ``grad_reduce_handle``: ``wait()`` completes the buckets."""

    def __init__(self, pending):
        self._pending = pending  # [(future, bucket, post_scale)]

    def wait(self):
        pending, self._pending = self._pending, []
        for fut, bucket, post in pending:
            fut.wait()
            if post != 1.0:
                bucket.grad_data.mul_(post)


class _Controller:
    """Per-model bookkeeping: which bucket call is the step's last."""

    def __init__(self, state, ddp, groups):
        self.state = state
        self.ddp = ddp
        self.total = sum(len(g.buckets) for g in groups)
        self.count = 0
        self.calls = 0

    def next_is_last(self) -> bool:
        self.count += 1
        self.calls += 1
        if self.count >= self.total:
            self.count = 0
            return True
        return False

    def post_scale(self, bucket, group_size: int) -> float:
        f = float(bucket.gradient_scaling_factor)
        return f if self.ddp.ddp_config.average_in_collective else f * group_size


def _start_grad_sync(self, force_all_reduce: bool = False):
    """Replacement of ``_ParamAndGradBucketGroup.start_grad_sync`` (bound per instance)."""
    ctl: _Controller = self._lorecomm
    if self.is_first_batch and self.grad_reduce_handle is not None:
        return  # megatron: already dispatched in the first batch
    assert self.grad_reduce_handle is None, "Should not have multiple communication calls outstanding at once"
    cfg = self.ddp_config
    if cfg.check_for_nan_in_grad or cfg.check_for_large_grads:
        self.check_grads(check_for_nan_or_inf=cfg.check_for_nan_in_grad,
                         check_for_large=cfg.check_for_large_grads)
    if cfg.use_distributed_optimizer:
        # every rank holds the whole local bucket in grad_data; lorecomm all-reduces the low-rank factors and
        # reconstructs the whole averaged bucket, of which the distributed optimizer reads this rank's shard
        # (what megatron's reduce-scatter would have written there)
        group_size = self.intra_distributed_optimizer_instance_size
    else:
        group_size = dist.get_world_size(self.data_parallel_group)
    state = ctl.state
    pending = []
    for bucket in self.buckets:
        params = bucket.params_list
        offsets = offsets_in(bucket.grad_data, [p.main_grad for p in params])
        is_last = ctl.next_is_last()
        post = ctl.post_scale(bucket, group_size)
        if cfg.overlap_grad_reduce:
            pending.append((state.reduce_async(bucket.grad_data, params, offsets, is_last=is_last), bucket, post))
        else:
            state.reduce(bucket.grad_data, params, offsets, is_last=is_last)
            if post != 1.0:
                bucket.grad_data.mul_(post)
    # megatron's finish_grad_sync waits on this handle when overlapping, and
    # expects None after a synchronous call
    self.grad_reduce_handle = _Handle(pending) if cfg.overlap_grad_reduce else None


def register(ddp_model, state=None, **config):
    """Route a megatron-core DDP model's gradient sync through lorecomm; returns the state.

    ``register(ddp, rank=16, ...)`` builds a ``LoreState`` (``compressor=...``
    another, see ``lorecomm.COMPRESSORS``; GreedyLore's ``dense_name_patterns``
    default to :data:`MEGATRON_DENSE_PATTERNS`) on the model's data-parallel
    ranks; ``register(ddp, state=...)`` uses a given state (any lorecomm state),
    which must reduce over those same ranks.
    Call it once, after constructing the DDP model and before the first
    backward pass.
    """
    try:
        from megatron.core.distributed import DistributedDataParallel as MegatronDDP
    except ImportError as e:  # pragma: no cover - exercised only without megatron-core
        raise ImportError("lorecomm.integrations.megatron needs megatron-core (pip install megatron-core)") from e

    if not isinstance(ddp_model, MegatronDDP):
        raise TypeError(f"expected megatron.core.distributed.DistributedDataParallel, got {type(ddp_model).__name__}"
                        " (for torch DDP use lorecomm.register)")
    cfg = ddp_model.ddp_config
    if getattr(getattr(ddp_model, "config", None), "fp16", False):
        raise NotImplementedError(
            "fp16 Megatron models are not supported: the loss is scaled (grad_scale_func) and unscaled only in "
            "optimizer.step, so the error-feedback buffer would hold loss-scaled gradients that every scale "
            "change replays at the wrong scale, and Megatron's scaler exposes no scale lorecomm could unscale "
            "by; use bf16 (or fp32)")
    if cfg.num_distributed_optimizer_instances != 1:
        raise NotImplementedError("num_distributed_optimizer_instances > 1 (partial distributed optimizer: a "
                                  "second all-reduce across optimizer instances) is not supported by "
                                  "lorecomm.integrations.megatron")
    if ddp_model.expert_parallel_bucket_groups:
        raise NotImplementedError(
            "expert-parallel (MoE) parameters reduce over the expert data-parallel group, a different process "
            "group than the dense parameters; one lorecomm state reduces over one group, so MoE models are "
            "not supported by lorecomm.integrations.megatron yet")
    groups = list(ddp_model.bucket_groups)
    if any(getattr(g, "_lorecomm", None) is not None for g in groups):
        raise RuntimeError("this megatron DDP model is already registered with lorecomm")
    if not groups:
        raise ValueError("the megatron DDP model has no bucket groups (no parameter requires grad)")
    dp_group = (groups[0].intra_distributed_optimizer_instance_group if cfg.use_distributed_optimizer
                else groups[0].data_parallel_group)
    state = make_state(state, config, dp_group, MEGATRON_DENSE_PATTERNS)
    check_group(state, dp_group, "megatron DDP")
    state.bind(ddp_model.module)
    ctl = _Controller(state, ddp_model, groups)
    for g in groups:
        g._lorecomm = ctl
        g.start_grad_sync = types.MethodType(_start_grad_sync, g)
    ddp_model._lorecomm = ctl
    return state
