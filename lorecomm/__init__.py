"""lorecomm: low-rank compressed gradient communication for data-parallel training.

>>> state = lorecomm.register(ddp_model, rank=16)                  # Lore, the default
>>> state = lorecomm.register(ddp_model, compression=16)           # a byte budget instead of a rank
>>> state = lorecomm.register(ddp_model, compressor="greedylore", rank=32)   # the paper's GreedyLore
"""
from __future__ import annotations

from .dense import DenseState, dense_hook
from .greedylore import GreedyLoreState, greedylore_hook
from .lore import LoreState, lore_hook
from .random_linear import RandomLinearState, random_linear_hook
from .replicas import replicas_identical
from .state import CommState

__all__ = [
    "CommState", "DenseState", "GreedyLoreState", "LoreState", "RandomLinearState", "COMPRESSORS",
    "dense_hook", "greedylore_hook", "lore_hook", "random_linear_hook", "hook_for", "register",
    "replicas_identical",
]

#: ``register(..., compressor=name)``: the state class each name builds
COMPRESSORS = {"lore": LoreState, "greedylore": GreedyLoreState, "random_linear": RandomLinearState,
               "dense": DenseState}
_HOOKS = {LoreState: lore_hook, GreedyLoreState: greedylore_hook, RandomLinearState: random_linear_hook,
          DenseState: dense_hook}


def hook_for(state: CommState):
    """The DDP communication hook that runs ``state``."""
    for cls, hook in _HOOKS.items():
        if isinstance(state, cls):
            return hook
    raise TypeError(f"no lorecomm hook for {type(state).__name__}: state must be one of "
                    f"{', '.join(c.__name__ for c in _HOOKS)} (or a subclass)")


def register(ddp_model, state: CommState | None = None, compressor: str = "lore", **config) -> CommState:
    """Register a lorecomm hook on a DDP model and return its state.

    ``register(ddp, rank=16, ...)`` builds a LoreState (the default compressor)
    from ``config``; ``compressor="greedylore"`` (or "random_linear", "dense")
    builds that state instead; ``register(ddp, state=...)`` uses the given one.
    The process group defaults to the DDP model's.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(ddp_model, DDP):
        raise TypeError(
            f"lorecomm.register expects a torch.nn.parallel.DistributedDataParallel model, got "
            f"{type(ddp_model).__name__}; wrap it in DDP first (other stacks: see lorecomm.integrations)")
    from .integrations._common import check_group, make_state

    if state is None or compressor != "lore":  # (with state=, refused with the rest of config)
        config = {**config, "compressor": compressor}
    state = make_state(state, config, ddp_model.process_group)
    check_group(state, ddp_model.process_group, "the DDP model")
    state.bind(ddp_model)
    ddp_model.register_comm_hook(state, hook_for(state))
    return state
