"""PyTorch Lightning DDP on CPU with lorecomm on 2 Gloo ranks."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None and importlib.util.find_spec("pytorch_lightning") is None,
    reason="lightning is not installed (pip install lorecomm[integrations])")

STEPS = 5
def configs(compressor: str):
    """(r = a, r < a) configurations of each compressor (the exact one reproduces dense training:
    GreedyLore's full basis, Lore on an fp32 wire)."""
    if compressor == "greedylore":
        base = dict(compressor="greedylore", start_step=1, update_interval=3, min_compression_rate=0.5)
    else:
        base = dict(start_step=1, wire=torch.float32, min_compression_rate=0.5)
    return dict(base, rank=8), dict(base, rank=2)



def _pl():
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    return pl


def _train(rank, make_strategy, calls=None, plugins=None):
    import torch.distributed as dist

    pl = _pl()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))

        def on_train_batch_start(self, batch, batch_idx):
            if calls is not None:
                calls.append(0)  # count_calls adds this step's compressor calls here

        def training_step(self, batch, _):
            x, y = batch
            return ((self.net(x) - y) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.randn(4 * 2 * STEPS, 8, generator=g),
                                          torch.randn(4 * 2 * STEPS, 8, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # Lightning adds a DistributedSampler
    module = Module()
    strategy = make_strategy()
    trainer = pl.Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy=strategy, max_steps=STEPS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, plugins=plugins)
    trainer.fit(module, loader)
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered), "ranks hold different parameters"
    return flat


def _worker(rank, world_size, compressor):
    pl = _pl()
    import lorecomm
    from lorecomm.integrations._launch import count_calls
    from lorecomm.integrations.lightning import lore_strategy_class

    LoreDDPStrategy = lore_strategy_class(pl.strategies.DDPStrategy)
    out = {"dense": _train(rank, pl.strategies.DDPStrategy)}
    exact, low = configs(compressor)

    def make(cfg):
        cfg = dict(cfg)
        return lorecomm.COMPRESSORS[cfg.pop("compressor", "lore")](**cfg)

    for name, cfg in (("exact", exact), ("low", low)):
        state = make(cfg)
        calls = count_calls(state)
        out[name] = _train(rank, lambda: LoreDDPStrategy(ddp_comm_state=state), calls)
        out[name + "_stats"], out[name + "_calls"] = state.stats(), list(calls)
    # the stock strategy with a hook: silently never called on CPU (why LoreDDPStrategy exists)
    stock_state = make(exact)
    _train(rank, lambda: pl.strategies.DDPStrategy(ddp_comm_state=stock_state,
                                                   ddp_comm_hook=lorecomm.hook_for(stock_state)))
    out["stock_calls"] = stock_state.stats()["calls"]
    # "16-mixed" with a loss scaler (on CPU Lightning has none by default: given here): the state gets it
    from torch.amp import GradScaler

    MixedPrecision = importlib.import_module(pl.__name__ + ".plugins.precision").MixedPrecision
    scaler = GradScaler("cpu", init_scale=1024.0)
    state = make(low)
    flat = _train(rank, lambda: LoreDDPStrategy(ddp_comm_state=state),
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    out["fp16"] = dict(wired=state.grad_scaler is scaler, finite=bool(torch.isfinite(flat).all()),
                       steps=state.stats()["steps"], scale=float(scaler.get_scale()))
    return out


@pytest.mark.parametrize("compressor", ["lore", "greedylore"])
def test_lightning_lore_ddp_strategy_two_ranks(compressor):
    from lorecomm.integrations._launch import run_ranks

    results = run_ranks(_worker, 2, compressor)
    r = results[0]
    for name in ("exact", "low"):
        st = r[name + "_stats"]
        # one DDP bucket per step: the hook ran on every one of the STEPS steps (counted)
        assert r[name + "_calls"] == [1] * STEPS and st["calls"] == STEPS and st["steps"] == STEPS, st
        assert st["steps_by_phase"]["compressed"] >= 2 and st["compressed_matrices"] == 2, st
    torch.testing.assert_close(r["exact"], r["dense"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(r["low"], r["dense"], atol=1e-6)
    assert r["low_stats"]["bytes_by_phase"]["compressed"] < r["exact_stats"]["bytes_by_phase"]["compressed"]
    for key in ("dense", "exact", "low"):
        assert torch.equal(results[0][key], results[1][key])
    assert r["stock_calls"] == 0  # Lightning's DDPStrategy drops the hook on CPU
    assert r["fp16"]["wired"] and r["fp16"]["finite"] and r["fp16"]["steps"] == STEPS, r["fp16"]


def test_strategy_importable_by_name():
    from lorecomm.integrations.lightning import LoreDDPStrategy

    assert LoreDDPStrategy.__name__ in ("LoreDDPStrategy", "PLLoreDDPStrategy")
    assert "DDPStrategy" in [c.__name__ for c in LoreDDPStrategy.__mro__]
