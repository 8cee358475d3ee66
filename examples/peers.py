"""Avalanche 0.6's own strategies on one of our streams, evaluated exactly as our Lightning runs.

The strategy trains the same network (``ContinualClassifier.net``) with the same optimizer
(``ContinualClassifier.configure_optimizers``), batch size and epochs per experience, on the same
Avalanche benchmark object the datamodule wraps, through Avalanche's own loop
(``strategy.train(experience)``). After each experience, every test experience is scored with the
rule of ``ContinualClassificationMixin``: in class-IL the logits of classes not yet trained are
masked out. The accuracy matrix then goes through ``cl_plugins.metrics`` like ours.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cl_plugins.metrics import continual_summary
from datamodules import ContinualDataModule

#: Avalanche strategy names the runner accepts, with the class in ``avalanche.training.supervised``
STRATEGIES = {
    "Naive": "Naive", "Replay": "Replay", "DER": "DER", "EWC": "EWC", "LwF": "LwF",
    "GEM": "GEM", "AGEM": "AGEM", "SI": "SynapticIntelligence", "GDumb": "GDumb", "Cumulative": "Cumulative",
}


def check_peer(name: str, dm: ContinualDataModule) -> None:
    """Raises when ``name`` is no known strategy or the stream is one the peers do not support here."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown Avalanche strategy {name!r}: choose one of {sorted(STRATEGIES)}")
    if dm.scenario == "task":
        raise ValueError(
            "Avalanche peers run on class- and domain-incremental streams here (their single-head "
            "loop trains on every logit, while our task-IL training masks logits by task): use "
            "scenario 'class' for a stream with peers"
        )


def make_strategy(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, dm: ContinualDataModule,
                  device: str, **kwargs: Any) -> Any:
    """Avalanche's ``name`` strategy on ``model``, batch size and epochs taken from ``dm``, no
    loggers or metrics of its own (we evaluate as in our runs)."""
    import avalanche.training.supervised as supervised
    from avalanche.training.plugins import EvaluationPlugin

    check_peer(name, dm)

    def quiet_evaluator() -> EvaluationPlugin:  # a fresh one per strategy: no metrics, no loggers
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return EvaluationPlugin(loggers=[])

    cls = getattr(supervised, STRATEGIES[name])
    return cls(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=dm.batch_size,
               train_epochs=dm.epochs_per_experience, eval_mb_size=dm.eval_batch_size, device=device,
               evaluator=quiet_evaluator, **kwargs)


@torch.no_grad()
def accuracy_row(model: nn.Module, dm: ContinualDataModule, trained: int, device: str = "cpu") -> list[float]:
    """Accuracy on every test experience after training experiences ``0..trained``; in class-IL
    the logits of classes of later experiences are masked out (``ContinualClassificationMixin``)."""
    mask = None
    if dm.scenario == "class":
        seen = sorted({c for i in range(trained + 1) for c in dm.classes_in_experience[i]})
        mask = torch.zeros(dm.num_classes, dtype=torch.bool, device=device)
        mask[seen] = True
    was_training = model.training
    model.eval()
    row = []
    for j in range(dm.num_test_experiences):
        correct = total = 0
        for x, y, _ in DataLoader(dm.test_dataset(j), batch_size=dm.eval_batch_size):
            logits = model(x.to(device))
            if mask is not None:
                logits = logits[:, : mask.numel()].masked_fill(~mask, torch.finfo(logits.dtype).min)
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += len(y)
        row.append(correct / max(total, 1))
    model.train(was_training)
    return row


def run_peer(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, dm: ContinualDataModule,
             device: str = "cpu", **kwargs: Any) -> dict[str, Any]:
    """Trains the whole stream with Avalanche's ``name`` strategy; returns the metrics summary, the
    accuracy matrix and the wall time of training plus the per-experience evaluation (what our
    ``fit`` times too)."""
    strategy = make_strategy(name, model, optimizer, dm, device, **kwargs)
    matrix = []
    start = time.perf_counter()
    with warnings.catch_warnings():  # Avalanche 0.6 warns of its own deprecations on every experience
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"avalanche\.")
        for i, experience in enumerate(dm.benchmark.train_stream):
            strategy.train(experience, num_workers=dm.num_workers)
            matrix.append(accuracy_row(model, dm, i, device))
    wall = time.perf_counter() - start
    return {**continual_summary(matrix)["final"], "wall_s": wall, "matrix": matrix}
