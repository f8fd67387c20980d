"""lorecomm integrations with training stacks other than plain torch DDP.

Each submodule imports its stack lazily (only when imported itself), so
``import lorecomm`` never needs them:

- ``lorecomm.integrations.megatron``: megatron-core ``DistributedDataParallel``
  (bucket-group grad sync replaced, overlap_grad_reduce on and off).
- ``lorecomm.integrations.deepspeed``: DeepSpeed engine, ZeRO stage 0
  (the engine's bucket all-reduce replaced; clipping stays after averaging).
- ``lorecomm.integrations.lightning``: ``LoreDDPStrategy``, a Lightning
  ``DDPStrategy`` that registers the hook on every device type.
- ``lorecomm.integrations.accelerate``: register on the prepared model.
- ``lorecomm.integrations.fsdp``: FSDP2 is not supported (the reason is in
  its docstring and its error message).

See docs/INTEGRATIONS.md.
"""
