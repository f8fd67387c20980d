"""lorecomm (Lore by default, or any lorecomm state) in a DeepSpeed engine: ZeRO stage 0 (fp32)
and ZeRO stages 1 and 2 (fp32 or bf16).

Usage::

    import deepspeed
    from lorecomm.integrations import deepspeed as lore_deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    state = lore_deepspeed.register(engine, rank=16, start_step=1000)
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
``communication_data_type`` is not used (lorecomm picks what it sends); register warns if it is set.

ZeRO stages 1 and 2 (``DeepSpeedZeroOptimizer``): each rank owns a
partition of the optimizer state (stage 1) and of the gradients (stage 2).
During backward the optimizer copies gradients into contiguous buckets and
hands each full bucket to ``average_tensor``, which reduce-scatters it (or
all-reduces it, ``reduce_scatter: false``) before every rank copies its
partition out. ``register`` replaces ``average_tensor`` on the optimizer
instance: the bucket's parameters (and their shapes) are known from the
optimizer's bucket records, lorecomm all-reduces the low-rank factors and
every rank reconstructs the whole averaged bucket, from which DeepSpeed's
unchanged code copies this rank's partition (the trick of the Megatron
distributed-optimizer integration). The step ends in the optimizer's
reduction epilogue at the gradient-accumulation boundary (stage 2 reduces
every micro-batch, as DeepSpeed does; stage 1 only at the boundary). Needs
``contiguous_gradients`` (the default).

Refused at ``register`` (with the reason): ZeRO stage 3 (parameters are
partitioned too: no rank holds whole matrices), fp16 engines (loss scaling
would put scaled gradients in the error-feedback buffer), bf16 without ZeRO
(the BF16 optimizer reduces its own fp32 accumulation buffers), pipeline
parallelism, sequence parallelism and MoE layers (other process groups).

CPU note: on a CPU-only machine DeepSpeed's communication backend
JIT-compiles a shared-memory all-reduce op on first use (minutes on a small
machine, cached under ~/.cache/torch_extensions). lorecomm does not need it;
:func:`skip_cpu_shm_op` turns that build off before ``deepspeed.initialize``.
"""
from __future__ import annotations

import types
import warnings

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
                                   "not a parameter's .grad: an optimizer that reduces its own buffers (bf16 without ZeRO, 1-bit "
                                   "optimizers) is not supported; use bf16 with ZeRO stage 1 or 2, or an fp32 engine")
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

    ``register(engine, rank=16, ...)`` builds a ``LoreState`` (``compressor=...``
    another) on the
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
    stage = engine.zero_optimization_stage()
    if stage >= 3:
        raise NotImplementedError(
            f"ZeRO stage {stage} is not supported: it partitions the parameters too, so no rank holds a whole "
            "matrix to compress; use ZeRO stage 1 or 2 (optimizer state / gradients partitioned) with lorecomm")
    if engine.fp16_enabled():
        raise NotImplementedError(
            "fp16 DeepSpeed engines are not supported: fp16 loss scaling would store scaled gradients in the "
            "error-feedback buffer (and keep those of the steps the scaler skips); use bf16 with ZeRO stage 1 or 2, "
            "or fp32")
    if engine.bfloat16_enabled() and stage == 0:
        raise NotImplementedError(
            "bf16 without ZeRO is not supported: the BF16 optimizer reduces its own fp32 accumulation buffers "
            "instead of the parameters' gradients; use bf16 with ZeRO stage 1 or 2, or an fp32 engine")
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None or \
            getattr(engine.optimizer, "torch_autocast_gradscaler", None) is not None:
        raise NotImplementedError(
            "DeepSpeed's fp16 torch_autocast runs a GradScaler (on ZeRO 0, 1 and 2): the gradients lorecomm would compress "
            "are loss-scaled (unscaled only in step()), so the error-feedback buffer would mix scales and keep "
            "the values of steps the scaler skips; use bf16 torch_autocast or fp32")
    if stage > 0 and not engine.managed_gradient_accumulation():
        raise NotImplementedError(
            "managed_gradient_accumulation=false with ZeRO: the accumulation boundary is known only inside "
            "engine.step(), after the ZeRO optimizer's reduction ran, so lorecomm could not tell when a step "
            "ends (it would never leave its dense warm-up); use managed gradient accumulation (the default), "
            "or ZeRO stage 0")
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

    given = getattr(getattr(engine, "_config", None), "communication_data_type", None)
    if given is not None:
        warnings.warn(f"DeepSpeed's communication_data_type ({given}) is not used: lorecomm sends what its "
                      f"state says (LoreState's wire=, DenseState's dtype=)", stacklevel=2)
    dp_group = groups._get_sequence_data_parallel_group()
    state = make_state(state, config, dp_group)
    check_group(state, dp_group, "the DeepSpeed engine")
    state.bind(engine.module)
    if stage in (1, 2):
        _register_zero(engine, state, stage)
        return state
    ctl = _Controller(engine, state)
    engine._lorecomm = ctl
    engine.allreduce_and_copy = types.MethodType(_allreduce_and_copy, engine)
    engine.buffered_allreduce_fallback = types.MethodType(_make_fallback(engine.buffered_allreduce_fallback), engine)
    return state


class _ZeroController:
    """ZeRO 1/2: the optimizer's buckets through lorecomm, each rank taking its partition."""

    def __init__(self, engine, optimizer, state, stage):
        self.engine, self.opt, self.state, self.stage = engine, optimizer, state, stage

    def bucket_params(self, tensor, comm_dtype):
        """The parameters of the bucket ``average_tensor`` was handed, at their offsets in it."""
        opt = self.opt
        records = opt.ipg_buckets[comm_dtype].params
        params = [opt.bit16_groups[g][i] for g, i, _ in records]
        offsets, pos = [], 0
        for p in params:
            offsets.append(pos)
            pos += p.numel()
        if pos != tensor.numel():
            raise RuntimeError(
                f"lorecomm.integrations.deepspeed: a ZeRO bucket of {tensor.numel()} elements holds parameters of "
                f"{pos} elements: this DeepSpeed version lays its buckets out differently than lorecomm expects")
        return params, offsets

    def average_tensor(self, tensor, comm_dtype):
        if tensor.numel() == 0:
            return
        opt = self.opt
        params, offsets = self.bucket_params(tensor, comm_dtype)
        self.state.reduce(tensor, params, offsets, is_last=False)  # the mean over the data-parallel ranks
        if not opt.gradient_average:
            tensor.mul_(dist.get_world_size(group=opt.dp_process_group))
        if tensor.is_cuda and getattr(opt, "overlap_comm", False):
            # DeepSpeed copies the partitions out on its reduction stream
            opt.reduction_stream.wait_stream(torch.cuda.current_stream(tensor.device))
        opt._add_full_reduction_to_compact_grad_partition(tensor, comm_dtype)

    def epilogue(self, original):
        def independent_gradient_partition_epilogue():
            original()
            # stage 2 reduces every micro-batch, stage 1 only at the boundary: one step per optimizer step
            if self.stage == 1 or self.opt.is_gradient_accumulation_boundary():
                self.state.end_step()
        return independent_gradient_partition_epilogue


def _register_zero(engine, state, stage):
    opt = engine.optimizer
    for attr in ("ipg_buckets", "bit16_groups", "average_tensor", "independent_gradient_partition_epilogue",
                 "_add_full_reduction_to_compact_grad_partition"):
        if not hasattr(opt, attr):
            raise NotImplementedError(
                f"lorecomm.integrations.deepspeed: the ZeRO optimizer {type(opt).__name__} has no {attr}; this "
                f"DeepSpeed version is not supported with ZeRO stage {stage} (tested: 0.19.8)")
    if not opt.contiguous_gradients:
        raise NotImplementedError(
            "ZeRO with contiguous_gradients=false is not supported: its reduction path flattens gradients without "
            "the bucket records lorecomm reads parameter shapes from; set zero_optimization.contiguous_gradients "
            "to true (the default)")
    if getattr(opt, "_lorecomm", None) is not None:
        raise RuntimeError("this DeepSpeed engine is already registered with lorecomm")
    ctl = _ZeroController(engine, opt, state, stage)
    opt._lorecomm = ctl
    opt.average_tensor = ctl.average_tensor
    opt.independent_gradient_partition_epilogue = ctl.epilogue(opt.independent_gradient_partition_epilogue)
    engine._lorecomm = ctl
