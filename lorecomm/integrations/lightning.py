"""lorecomm in PyTorch Lightning: a DDP strategy that always registers the hook.

Usage::

    import lorecomm
    from lorecomm.integrations.lightning import LoreDDPStrategy

    strategy = LoreDDPStrategy(ddp_comm_state=lorecomm.LoreState(rank=16))
    trainer = lightning.pytorch.Trainer(strategy=strategy, accelerator="cpu" or "gpu", devices=...)

Why a strategy: Lightning's ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)``
registers the communication hook only when the root device is CUDA
(``DDPStrategy._register_ddp_hooks``), so on CPU (Gloo) the hook is silently
never called. ``LoreDDPStrategy`` registers it on every device type, binds
the state to the wrapped model (parameter names for ``dense_name_patterns``)
and picks the hook that matches the state (``lorecomm.hook_for``) unless
``ddp_comm_hook`` is given. Without ``ddp_comm_state`` it uses
``LoreState()`` with its defaults. All other keyword arguments
are ``DDPStrategy``'s.

``LoreDDPStrategy`` subclasses ``lightning.pytorch.strategies.DDPStrategy``
(the ``lightning`` package); with only ``pytorch_lightning`` installed it
subclasses ``pytorch_lightning.strategies.DDPStrategy``. Both at once: use
``PLLoreDDPStrategy`` with a ``pytorch_lightning.Trainer``.
"""
from __future__ import annotations

import importlib

from ._common import adopt_grad_scaler

__all__ = ["LoreDDPStrategy", "PLLoreDDPStrategy", "lore_strategy_class"]

_classes: dict = {}


def lore_strategy_class(ddp_strategy_cls):
    """A subclass of the given Lightning ``DDPStrategy`` class that always registers lorecomm."""
    if ddp_strategy_cls in _classes:
        return _classes[ddp_strategy_cls]

    class LoreDDPStrategy(ddp_strategy_cls):
        strategy_name = "lorecomm_ddp"

        def __init__(self, *args, ddp_comm_state=None, ddp_comm_hook=None, **kwargs):
            import lorecomm

            if ddp_comm_state is None:
                ddp_comm_state = lorecomm.LoreState()
            if ddp_comm_hook is None:
                ddp_comm_hook = lorecomm.hook_for(ddp_comm_state)
            super().__init__(*args, ddp_comm_state=ddp_comm_state, ddp_comm_hook=ddp_comm_hook, **kwargs)

        @property
        def lorecomm_state(self):
            """The lorecomm state (stats(), state_dict() for checkpoints)."""
            return self._ddp_comm_state

        def _register_ddp_hooks(self) -> None:
            # the stock strategy does this only when root_device.type == "cuda"
            from torch.nn.parallel import DistributedDataParallel

            assert isinstance(self.model, DistributedDataParallel)
            state, hook = self._ddp_comm_state, self._ddp_comm_hook
            if self._ddp_comm_wrapper is not None:
                hook = self._ddp_comm_wrapper(hook)
            state.bind(self.model)
            adopt_grad_scaler(state, getattr(self.precision_plugin, "scaler", None))  # "16-mixed"
            self.model.register_comm_hook(state=state, hook=hook)

    LoreDDPStrategy.__qualname__ = LoreDDPStrategy.__name__ = (
        "LoreDDPStrategy" if ddp_strategy_cls.__module__.startswith("lightning.") else "PLLoreDDPStrategy")
    _classes[ddp_strategy_cls] = LoreDDPStrategy
    return LoreDDPStrategy


def __getattr__(name):
    if name == "LoreDDPStrategy":
        for mod in ("lightning.pytorch.strategies", "pytorch_lightning.strategies"):
            try:
                return lore_strategy_class(importlib.import_module(mod).DDPStrategy)
            except ImportError:
                continue
        raise ImportError("lorecomm.integrations.lightning needs lightning (pip install lightning) "
                          "or pytorch_lightning")
    if name == "PLLoreDDPStrategy":
        return lore_strategy_class(importlib.import_module("pytorch_lightning.strategies").DDPStrategy)
    raise AttributeError(name)
