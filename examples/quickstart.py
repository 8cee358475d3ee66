"""Add a continual stream and mitigation callbacks to an existing LightningModule and Trainer.

Run: ``python examples/quickstart.py``. The module below is an ordinary Lightning module; the
only continual-learning additions are marked "# CL".
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from callbacks import ExperienceReplay  # CL
from callbacks.metrics import ContinualMetrics  # CL
from datamodules import SplitDigits  # CL


class MyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                       torch.nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, *_ = batch  # CL: stream batches are (x, y, task_label)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):  # CL: one val loader per experience
        x, y, *_ = batch
        return {"preds": self(x).argmax(-1)}

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


if __name__ == "__main__":
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2)  # CL
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[ExperienceReplay(buffer_size=200), ContinualMetrics(output_dir="runs/quickstart")])
    trainer.fit(MyModel(), datamodule=dm)
