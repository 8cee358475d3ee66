"""Command line: ``python train.py fit --config configs/<name>.yaml`` trains a whole stream.

A ``LightningCLI`` with the omegaconf parser (``${...}`` interpolation works in configs). The
model is any LightningModule (``cl_plugins.ContinualClassifier`` by default), the data any
``datamodules.ContinualDataModule``; mitigations are ``trainer.callbacks`` entries.
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from cl_plugins.models import ContinualClassifier
from datamodules.stream import ContinualDataModule


def main(args: list[str] | None = None) -> LightningCLI:
    """Runs the CLI (``args`` replaces ``sys.argv[1:]``, for tests)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return LightningCLI(
        ContinualClassifier,
        ContinualDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"num_sanity_val_steps": 0, "reload_dataloaders_every_n_epochs": 1},
        args=args,
    )


def shutdown_distributed() -> None:
    """Destroys the process group Lightning's DDP/FSDP left initialized. Without it Gloo's worker threads
    can outlive the interpreter's teardown and abort the process (SIGABRT, "terminate called without an
    active exception") after a run that finished, turning its exit status into a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    shutdown_distributed()
