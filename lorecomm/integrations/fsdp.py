"""lorecomm in FSDP2 (``torch.distributed.fsdp.fully_shard``): hybrid sharding with a
compressed cross-replica all-reduce.

The multi-node setup that needs compression: shard inside a node (fast links),
replicate across nodes (slow links). FSDP2 shards the model over the
intra-node ``shard`` group as usual; lorecomm replaces the cross-node
all-reduce of native HSDP with its compressed one, over the ``replicate``
group, on every rank's gradient shard (so error buffers are shard-sized)::

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from lorecomm.integrations import fsdp as lore_fsdp

    mesh = init_device_mesh("cuda", (nodes, gpus_per_node), mesh_dim_names=("replicate", "shard"))
    for block in model.layers:
        fully_shard(block, mesh=mesh["shard"])        # 1-D FSDP over the intra-node group
    fully_shard(model, mesh=mesh["shard"])
    state = lore_fsdp.register(model, mesh=mesh, rank=16, start_step=1000)   # or replicate_group=...
    # train as usual: loss.backward(); optimizer.step()

How it plugs in: ``FSDPModule.set_all_reduce_hook(hook)`` on every FSDP module.
With 1-D FSDP the hook receives the reduce-scatter output: this rank's shard
of every parameter of the module's group, each padded to FSDP's shard size,
back to back. The layout comes from the FSDP parameters themselves (each
``FSDPParam``'s ``sharded_size`` and ``padded_sharded_param_size``, in the
group's order), not guessed: an m x n weight sharded on dim 0 is an
(m / shards) x n matrix, still compressed as a matrix; conv kernels and 1-D
tensors as in DDP; FSDP's padding travels as dense leftovers (zeros). The
hook averages the buffer across the replicate group in place
(``state.reduce``); FSDP then divides (its post-divide factor) and views the
shards out as gradients, exactly as after its own all-reduce.

The last module group of a backward passes ``is_last=True`` (the step counter
advances once per optimizer step); gradient accumulation with
``model.set_requires_gradient_sync(False)`` on the non-final micro-batches
skips the reduce-scatter and the hook alike. ``MixedPrecisionPolicy``'s
``reduce_dtype`` (e.g. bf16) is the bucket's dtype. Every replica group's
ranks end with bit-identical shards; checkpoints are per rank.

Refused at ``register`` (with the reason): a module sharded with FSDP2's
native HSDP (a 2-D mesh: its own all-reduce runs before the hook, so there is
nothing left to compress; shard over ``mesh["shard"]`` instead), per-parameter
meshes (several parameter groups per module), and a hook already set. At
hook time: a module group that produced gradients for only some of its
trainable parameters (the layout would be ambiguous). Frozen parameters
(``requires_grad=False``) are skipped, as FSDP skips them; a module with only
frozen ones is not hooked (FSDP reduces nothing for it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._common import make_state

__all__ = ["register"]


def _fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _param_group(module):
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12: a list (per-parameter meshes)
    if groups is None:  # torch 2.11: one optional group per module
        groups = [state._fsdp_param_group] if state._fsdp_param_group is not None else []
    if len(groups) > 1:
        raise NotImplementedError(
            f"{type(module).__name__} has {len(groups)} FSDP parameter groups (per-parameter meshes from "
            f"shard_placement_fn): lorecomm needs one group per FSDP module")
    return groups[0] if groups else None


class _Controller:
    """Per-model bookkeeping: the hook calls of one backward, and which is the last."""

    def __init__(self, state, groups):
        self.state = state
        self.groups = groups  # the FSDPParamGroups whose hook lorecomm set
        self.calls = 0

    def next_is_last(self) -> bool:
        self.calls += 1
        if self.calls >= len(self.groups):
            self.calls = 0
            return True
        return False

    @staticmethod
    def layout(group, numel: int):
        """(sharded params, offsets, shard shapes) of the group's reduce-scatter output."""
        params, offsets, shapes = [], [], []
        pos = 0
        for fp in group.fsdp_params:
            if not fp.sharded_param.requires_grad:  # frozen: FSDP reduce-scatters only what has gradients
                continue
            params.append(fp.sharded_param)
            offsets.append(pos)
            shapes.append(tuple(fp.sharded_size))
            pos += fp.padded_sharded_param_size.numel()
        if pos != numel:
            raise RuntimeError(
                f"lorecomm.integrations.fsdp: the reduce-scatter output of an FSDP module holds {numel} elements, "
                f"but its {len(params)} parameters' shards take {pos}: only some of its parameters produced "
                f"gradients in this backward, so the layout is ambiguous. Give every parameter of an FSDP module a "
                f"gradient each step (or wrap the unused ones in their own fully_shard module)")
        return params, offsets, shapes


def _make_hook(ctl: _Controller, group):
    def hook(reduce_output: torch.Tensor) -> None:
        params, offsets, shapes = ctl.layout(group, reduce_output.numel())
        ctl.state.reduce(reduce_output, params, offsets, is_last=ctl.next_is_last(), shapes=shapes)

    return hook


def register(model, mesh=None, replicate_group=None, state=None, **config):
    """Compress the cross-replica all-reduce of a ``fully_shard`` model; returns the state.

    ``model``: the root module, sharded with ``fully_shard(..., mesh=<the 1-D shard mesh>)``
    (its submodules too). ``mesh``: the 2-D ``DeviceMesh`` with a ``"replicate"`` dimension
    (``mesh_dim_names=("replicate", "shard")``), or ``replicate_group``: the process group of
    this rank's replicas. ``register(model, mesh=mesh, rank=16, ...)`` builds a ``LoreState``
    (``compressor="greedylore"`` and its keywords for the paper's GreedyLore) on the replicate
    group; ``state=`` uses a given lorecomm state (which must reduce over that group).
    """
    from torch.distributed.fsdp._fully_shard._fsdp_common import HSDPMeshInfo

    if (mesh is None) == (replicate_group is None):
        raise ValueError("give either mesh=<2-D DeviceMesh with a 'replicate' dimension> or "
                         "replicate_group=<this rank's replica process group>")
    if mesh is not None:
        names = mesh.mesh_dim_names or ()
        if "replicate" not in names:
            raise ValueError(f"the mesh needs a dimension named 'replicate' (mesh_dim_names={names}); "
                             f"or pass replicate_group=")
        replicate_group = mesh["replicate"].get_group()
    if not isinstance(replicate_group, dist.ProcessGroup):
        raise ValueError(f"replicate_group must be a torch.distributed.ProcessGroup, got "
                         f"{type(replicate_group).__name__}")
    modules = _fsdp_modules(model)
    if not modules:
        raise TypeError(f"{type(model).__name__} is not sharded with torch.distributed.fsdp.fully_shard "
                        f"(no FSDPModule in it); for DDP use lorecomm.register")
    if getattr(model, "_lorecomm", None) is not None:
        raise RuntimeError("this FSDP model is already registered with lorecomm")
    pairs = []
    for m in modules:
        group = _param_group(m)
        if group is None or not any(fp.sharded_param.requires_grad for fp in group.fsdp_params):
            continue  # no parameters, or all frozen: FSDP never reduces (nor calls the hook) for it
        if isinstance(group.mesh_info, HSDPMeshInfo):
            raise NotImplementedError(
                f"{type(m).__name__} is sharded with FSDP2's native HSDP (a 2-D mesh): its own all-reduce across "
                f"replicas runs before any hook, so there is nothing left for lorecomm to compress. Shard with "
                f"fully_shard(module, mesh=mesh['shard']) and pass mesh= (or replicate_group=) to "
                f"lorecomm.integrations.fsdp.register")
        if group._all_reduce_hook is not None:
            raise RuntimeError(f"{type(m).__name__} already has an all-reduce hook (set_all_reduce_hook)")
        pairs.append((m, group))
    if not pairs:
        raise ValueError("the FSDP model has no sharded parameters")
    state = make_state(state, config, replicate_group)
    if getattr(state, "compression", None) is not None:
        raise ValueError(
            f"compression={state.compression:g} is not supported with FSDP2: its ranks are planned on whole "
            f"matrices, but each replica sends the factors of its shards, which would compress less than asked; "
            f"give rank=r instead")
    sgroup = state.process_group if state.process_group is not None else dist.group.WORLD
    if dist.get_process_group_ranks(sgroup) != dist.get_process_group_ranks(replicate_group):
        raise ValueError(
            f"the lorecomm state's process group (ranks {dist.get_process_group_ranks(sgroup)}) is not the replicate "
            f"group (ranks {dist.get_process_group_ranks(replicate_group)}); build the state with "
            f"process_group=<the replicate group> or let register build it")
    state.bind(model)
    ctl = _Controller(state, [g for _, g in pairs])
    for m, group in pairs:
        m.set_all_reduce_hook(_make_hook(ctl, group))
    model._lorecomm = ctl
    return state
