"""Lore (lorecomm's default compressor) in PyTorch Lightning.  Run (Lightning starts the 2 CPU
processes itself):

    python examples/lightning_lore.py
"""
import lightning.pytorch as pl
import torch

import lorecomm
from lorecomm.integrations.lightning import LoreDDPStrategy


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))

    def training_step(self, batch, _):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main():
    torch.manual_seed(0)
    x = torch.randn(2048, 64)
    y = x @ torch.randn(64, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    state = lorecomm.LoreState(rank=8, start_step=5)
    strategy = LoreDDPStrategy(ddp_comm_state=state)  # <- the lorecomm line
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=30, logger=False,
                         enable_checkpointing=False)
    module = Regression()
    trainer.fit(module, loader)
    same = lorecomm.replicas_identical(module)  # a collective: every rank checks
    if trainer.global_rank == 0:
        st = state.stats()
        print({k: st[k] for k in ("steps", "calls", "compression_ratio", "steps_by_phase")})
        print(f"replicas identical: {same}")


if __name__ == "__main__":
    main()
