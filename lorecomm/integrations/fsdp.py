"""FSDP2 (``torch.distributed.fsdp.fully_shard``): not supported, and why.

GreedyLore compresses each rank's *whole local gradient matrix* before any
reduction: it adds the rank's error-feedback buffer, projects onto a basis
of the matrix's short side, all-reduces the low-rank factors and
reconstructs the full averaged matrix. FSDP2's two extension points do not
give a hook that shape:

- ``FSDPModule.set_all_reduce_hook(hook)`` runs *after* the reduce-scatter:
  ``hook(reduce_output)`` receives this rank's already-reduced shard (or,
  with HSDP, the all-reduce output). The local matrices are gone by then, so
  there is nothing left to compress; replacing the reduce-scatter with a
  factor all-reduce is not what the hook can do.
- ``FSDPModule.set_custom_reduce_scatter(comm)`` receives one flat input
  buffer per parameter group -- every parameter's dim-0 shards, padded and
  interleaved by destination rank -- with no parameter identities or shapes
  in the ``ReduceScatter`` contract. Re-assembling the matrices would mean
  depending on FSDP2's private ``FSDPParam`` layout (padding, sharding
  placement, parameter order), which changes between torch releases, and
  the reconstructed full matrices would have to be written back as shards.

Use torch DDP (``lorecomm.register``), Megatron's DDP, DeepSpeed ZeRO-0,
Lightning or Accelerate (see docs/INTEGRATIONS.md). Sharded data
parallelism would need the compressor inside FSDP's reduce-scatter with
parameter metadata exposed; until torch offers that, :func:`register` raises.
"""
from __future__ import annotations

__all__ = ["register", "REASON"]

REASON = (
    "lorecomm does not support FSDP2 (fully_shard): GreedyLore must compress each rank's whole local gradient "
    "matrix before any reduction, but FSDP2's set_all_reduce_hook runs after the reduce-scatter (it receives "
    "this rank's already-reduced shard), and set_custom_reduce_scatter receives one flat, padded, rank-"
    "interleaved buffer with no parameter shapes or identities in its contract, so low-rank factors cannot be "
    "computed without depending on FSDP2's private parameter layout. Use DDP (lorecomm.register), Megatron DDP, "
    "DeepSpeed ZeRO stage 0, Lightning or Accelerate with DDP instead.")


def register(fsdp_module=None, state=None, **config):
    """Always raises ``NotImplementedError`` with :data:`REASON`."""
    raise NotImplementedError(REASON)
