"""lorecomm with Hugging Face Accelerate: register on the prepared model.

Usage::

    from accelerate import Accelerator
    from lorecomm.integrations import accelerate as lore_accelerate

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = lore_accelerate.register(accelerator, model, rank=16, start_step=1000)
    # train as usual: with accelerator.accumulate(model): ... accelerator.backward(loss) ...

Why not ``DistributedDataParallelKwargs(comm_hook=...)``: Accelerate maps
that field through its own ``DDPCommunicationHookType`` enum (no, fp16,
bf16, power_sgd, batched_power_sgd); any other value, such as a callable
hook, is silently ignored and training runs with dense all-reduce. lorecomm
therefore registers on the DDP model that ``accelerator.prepare`` returns
(``lorecomm.register``), and :func:`register` warns if it finds a callable
``comm_hook`` in the accelerator's DDP kwargs.

With ``mixed_precision="fp16"`` the state gets the accelerator's GradScaler
(``grad_scaler=``), so buckets are compressed in unscaled units.

Gradient accumulation (``accelerator.accumulate``) uses DDP's ``no_sync``:
the hook runs once per optimizer step, on the accumulated gradient.
With a single process (no DDP) :func:`register` returns ``None``: there is
nothing to communicate (it warns when WORLD_SIZE says otherwise: on a
CPU-only machine Accelerate sets up Gloo training only with
``Accelerator(cpu=True)`` or ``accelerate launch --cpu``).
"""
from __future__ import annotations

import os
import warnings

from ._common import adopt_grad_scaler

__all__ = ["register"]


def register(accelerator, model, state=None, **config):
    """Register lorecomm on ``accelerator.prepare``'s model; returns the state (None on one process)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import lorecomm

    handler = getattr(accelerator, "ddp_handler", None)
    hook = getattr(handler, "comm_hook", None)
    if hook is not None and callable(hook) and not isinstance(hook, str):
        warnings.warn(
            "DistributedDataParallelKwargs(comm_hook=<callable>) is ignored by Accelerate (it only accepts its "
            "DDPCommunicationHookType enum); lorecomm registers its hook on the prepared model instead -- drop "
            "comm_hook from the kwargs", stacklevel=2)
    ddp = model
    while not isinstance(ddp, DDP) and hasattr(ddp, "_orig_mod"):  # torch.compile'd model
        ddp = ddp._orig_mod
    if not isinstance(ddp, DDP):
        if accelerator.num_processes == 1:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                warnings.warn(
                    f"WORLD_SIZE={os.environ['WORLD_SIZE']} but Accelerate runs a single process, so every process "
                    "trains alone and lorecomm has nothing to register; on CPU use Accelerator(cpu=True) or "
                    "`accelerate launch --cpu`", stacklevel=2)
            return None
        raise TypeError(
            f"expected the model returned by accelerator.prepare (a DistributedDataParallel), got "
            f"{type(model).__name__}; for DeepSpeed/FSDP/Megatron plugins use the matching lorecomm integration "
            f"(FSDP2: lorecomm.integrations.fsdp)")
    state = lorecomm.register(ddp, state=state, **config)
    adopt_grad_scaler(state, getattr(accelerator, "scaler", None))  # mixed_precision="fp16"
    return state
