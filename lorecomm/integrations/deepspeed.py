"""GreedyLore in a DeepSpeed engine (ZeRO stage 0, fp32).

Usage::

    import deepspeed
    from lorecomm.integrations import deepspeed as lore_deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    state = lore_deepspeed.register(engine, rank=32, update_interval=200, start_step=1000)
    # train as usual: engine.backward(loss); engine.step()

How it plugs in: without ZeRO, DeepSpeed averages gradients at the
gradient-accumulation boundary, inside ``engine.backward`` (or inside
``engine.step`` with ``managed_gradient_accumulation=false``), through
``buffered_allreduce_fallback`` -> ``allreduce_no_retain`` ->
``allreduce_and_copy``, which still sees the per-parameter gradient tensors
(``param.grad``). ``register`` replaces ``allreduce_and_copy`` on the engine
instance: each chunk of gradients is flattened, mapped back to its
parameters (so every matrix keeps its shape) and averaged by
``state.reduce``; the last chunk of the boundary passes ``is_last=True``.

Gradient clipping (``gradient_clipping``, 1.0 in most DeepSpeed configs) runs
later, in ``engine.step()`` -> ``_take_model_step`` -> ``clip_fp32_gradients``,
on the averaged reconstructed gradient -- the same order as DeepSpeed's own
dense path, so local gradients are never clipped before compression. (This
is why the integration replaces the backward all-reduce instead of following
the 1-bit-Adam pattern, which communicates inside ``optimizer.step()``
after the engine has clipped the local gradients.)

Scaling matches DeepSpeed's ``allreduce_bucket``: the result is the average
times ``N / dp_world_size`` (1 in plain data parallelism) with
``gradient_average=True``, the sum otherwise; ``gradient_predivide_factor``
only changes where DeepSpeed divides, not the result.
``communication_data_type`` is not used (lorecomm picks what it sends).

Refused at ``register`` (with the reason): ZeRO stages 1-3 (the optimizer
partitions and reduce-scatters gradients), fp16/bf16 engines (the optimizer
reduces its own fp32 accumulation buffers, fp16 loss scaling would put scaled
gradients in the error-feedback buffer), pipeline parallelism, sequence
parallelism and MoE layers (other process groups).

CPU note: on a CPU-only machine DeepSpeed's communication backend
JIT-compiles a shared-memory all-reduce op on first use (minutes on a small
machine, cached under ~/.cache/torch_extensions). lorecomm does not need it;
:func:`skip_cpu_shm_op` turns that build off before ``deepspeed.initialize``.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist

from ._common import check_group, make_state

__all__ = ["register", "skip_cpu_shm_op"]


def skip_cpu_shm_op() -> None:
    """Do not build DeepSpeed's CPU shared-memory comm op (plain Gloo collectives are used).

    Call before ``deepspeed.init_distributed`` / ``deepspeed.initialize``.
    """
    import importlib

    # not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports torch itself under that name
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


class _Controller:
    def __init__(self, engine, state):
        self.engine = engine
        self.state = state
        self.collecting = False
        self.pending = []  # [(grads, dp_group, dp_world_size)]
        self.checked_groups = set()

    def params_of(self, grads):
        by_ptr = {}
        for p in self.engine.module.parameters():
            if p.grad is not None:
                by_ptr[(p.grad.data_ptr(), p.grad.dtype)] = p
        params = []
        for g in grads:
            p = by_ptr.get((g.data_ptr(), g.dtype))
            if p is None or p.grad.shape != g.shape:
                raise RuntimeError("lorecomm.integrations.deepspeed: a gradient handed to allreduce_no_retain is "
                                   "not a parameter's .grad (mixed-precision or ZeRO optimizers are not supported)")
            params.append(p)
        return params

    def run(self, chunks):
        state = self.state
        for i, (grads, dp_group, dp_world_size) in enumerate(chunks):
            key = id(dp_group)
            if key not in self.checked_groups:
                check_group(state, dp_group, "the DeepSpeed engine")
                self.checked_groups.add(key)
            params = self.params_of(grads)
            flat = self.engine.flatten(grads)
            state.reduce(flat, params, None, is_last=(i == len(chunks) - 1))
            n = dist.get_world_size(group=dp_group)
            if dp_world_size is None:
                dp_world_size = n
            post = n / dp_world_size if self.engine.gradient_average else float(n)
            if post != 1.0:
                flat.mul_(post)
            for g, synced in zip(grads, self.engine.unflatten(flat, grads)):
                g.copy_(synced)


def _allreduce_and_copy(self, small_bucket, dp_group, dp_world_size=None):
    ctl: _Controller = self._lorecomm
    if ctl.collecting:
        ctl.pending.append((list(small_bucket), dp_group, dp_world_size))
    else:  # called outside the engine's boundary reduction: one chunk, one step
        ctl.run([(list(small_bucket), dp_group, dp_world_size)])


def _make_fallback(original):
    def buffered_allreduce_fallback(self, grads=None, elements_per_buffer=500000000):
        ctl: _Controller = self._lorecomm
        ctl.collecting, ctl.pending = True, []
        try:
            original(grads=grads, elements_per_buffer=elements_per_buffer)
        finally:
            ctl.collecting = False
        chunks, ctl.pending = ctl.pending, []
        if chunks:
            ctl.run(chunks)
    return buffered_allreduce_fallback


def register(engine, state=None, **config):
    """Route a DeepSpeed engine's gradient averaging through lorecomm; returns the state.

    ``register(engine, rank=32, ...)`` builds a ``GreedyLoreState`` on the
    engine's data-parallel group; ``register(engine, state=...)`` uses a given
    lorecomm state. Call it once, after ``deepspeed.initialize``.
    """
    try:
        from deepspeed import DeepSpeedEngine
        from deepspeed.utils import groups
    except ImportError as e:  # pragma: no cover
        raise ImportError("lorecomm.integrations.deepspeed needs deepspeed (DS_BUILD_OPS=0 pip install deepspeed)") from e

    if not isinstance(engine, DeepSpeedEngine):
        raise TypeError(f"expected a deepspeed.DeepSpeedEngine (from deepspeed.initialize), got {type(engine).__name__}")
    if engine.zero_optimization_stage() != 0:
        raise NotImplementedError(
            f"ZeRO stage {engine.zero_optimization_stage()} is not supported: the ZeRO optimizer partitions and "
            "reduce-scatters the gradients itself, so no rank has the whole averaged matrix to reconstruct; use "
            "ZeRO stage 0 (data parallelism) with lorecomm")
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        raise NotImplementedError(
            "fp16/bf16 DeepSpeed engines are not supported: their optimizers reduce internal fp32 accumulation "
            "buffers instead of the parameters' gradients, and fp16 loss scaling would store scaled gradients in "
            "the error-feedback buffer; use an fp32 engine (bf16 torch.autocast inside the model is fine)")
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        raise NotImplementedError(
            "DeepSpeed's fp16 torch_autocast runs a GradScaler on ZeRO-0: the gradients lorecomm would compress "
            "are loss-scaled (unscaled only in step()), so the error-feedback buffer would mix scales and keep "
            "the values of steps the scaler skips; use bf16 torch_autocast or fp32")
    if engine.pipeline_parallelism:
        raise NotImplementedError("DeepSpeed pipeline parallelism is not supported by lorecomm.integrations.deepspeed")
    if getattr(engine, "sequence_parallel_size", 1) != 1:
        raise NotImplementedError("DeepSpeed sequence parallelism is not supported by lorecomm.integrations.deepspeed")
    if engine.has_moe_layers:
        raise NotImplementedError("DeepSpeed MoE layers reduce over expert data-parallel groups; not supported")
    if getattr(engine, "_lorecomm", None) is not None:
        raise RuntimeError("this DeepSpeed engine is already registered with lorecomm")
    if not engine.enable_backward_allreduce:
        raise RuntimeError("engine.enable_backward_allreduce is False: the optimizer (e.g. 1-bit Adam) does its own "
                           "communication; lorecomm cannot be combined with it")

    dp_group = groups._get_sequence_data_parallel_group()
    state = make_state(state, config, dp_group)
    check_group(state, dp_group, "the DeepSpeed engine")
    state.bind(engine.module)
    ctl = _Controller(engine, state)
    engine._lorecomm = ctl
    engine.allreduce_and_copy = types.MethodType(_allreduce_and_copy, engine)
    engine.buffered_allreduce_fallback = types.MethodType(_make_fallback(engine.buffered_allreduce_fallback), engine)
    return state
