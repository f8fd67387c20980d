"""lorecomm integrations with training stacks other than plain torch DDP.

Each submodule imports its stack lazily (only when imported itself), so
``import lorecomm`` never needs them:

- ``lorecomm.integrations.megatron``: megatron-core ``DistributedDataParallel``
  (bucket-group grad sync replaced, overlap_grad_reduce on and off).
- ``lorecomm.integrations.deepspeed``: DeepSpeed engine, ZeRO stages 0, 1, 2
  (the engine's or the ZeRO optimizer's bucket reduction replaced; clipping
  stays after averaging).
- ``lorecomm.integrations.lightning``: ``LoreDDPStrategy``, a Lightning
  ``DDPStrategy`` that registers the hook on every device type.
- ``lorecomm.integrations.accelerate``: register on the prepared model.
- ``lorecomm.integrations.fsdp``: FSDP2 hybrid sharding (``fully_shard`` over
  the shard group, lorecomm's compressed all-reduce over the replicate group).

See docs/INTEGRATIONS.md.
"""
