"""Our callbacks beside Avalanche 0.6's own strategies on the same Split-MNIST stream.

Same stream object (the Avalanche benchmark inside ``datamodules.SplitMNIST``: 5 x 2 classes,
class-IL), the same network (the small CNN of ``configs/default.yaml``, width 16), 1 epoch per
experience, batch 32, SGD lr 0.05, buffers of 500 samples. Avalanche's strategies run through
Avalanche's own training loop (``strategy.train(experience)``); ours through one Lightning
``fit``. Every accuracy matrix is computed the same way after each experience: accuracy on each
test experience, with the logits of classes not yet trained masked out (the rule of
``ContinualClassificationMixin`` for class-IL evaluation), then ``cl_plugins.metrics``.

Our replay rows: classic ER (the reservoir takes every sample and a replayed batch may hold
current-experience samples) and ``past_only=True`` (replays only samples of earlier experiences,
as Avalanche's ``Replay``, whose buffer is updated at experience ends).

Avalanche settings: Replay ``mem_size=500``; DER (DER++ with Avalanche's defaults ``alpha=0.1``,
``beta=0.5``) ``mem_size=500``; EWC ``ewc_lambda=100`` (separate mode); LwF ``alpha=1``,
``temperature=2``. Not tuned.

    python examples/bench_avalanche_peers.py --seeds 0 1 2 --markdown runs/peers.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import KFPF, ExperienceReplay  # noqa: E402
from cl_plugins import ContinualClassifier  # noqa: E402
from cl_plugins.metrics import continual_summary  # noqa: E402
from cl_plugins.models import SmallCNN  # noqa: E402
from datamodules import SplitMNIST  # noqa: E402
from datamodules.mnist import load_mnist_tensors  # noqa: E402
from examples.benchutils import markdown_table, mean_std, run_stream, write_markdown  # noqa: E402

BUFFER, LR, BATCH, WIDTH = 500, 0.05, 32, 16


@torch.no_grad()
def accuracy_row(model: nn.Module, dm: SplitMNIST, trained: int) -> list[float]:
    """Accuracy on every test experience after training experiences ``0..trained``, class-IL: the
    logits of classes of later experiences are masked out."""
    seen = sorted({c for i in range(trained + 1) for c in dm.classes_in_experience[i]})
    mask = torch.full((10,), float("-inf"))
    mask[seen] = 0.0
    model.eval()
    row = []
    for j in range(dm.num_experiences):
        correct = total = 0
        for x, y, _ in DataLoader(dm.test_dataset(j), batch_size=512):
            correct += int(((model(x) + mask).argmax(1) == y).sum())
            total += len(y)
        row.append(correct / total)
    return row


def avalanche_strategies() -> dict[str, Callable[[nn.Module, torch.optim.Optimizer], Any]]:
    """Factories of Avalanche's strategies (imported lazily: importing Avalanche is slow)."""
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import DER, EWC, LwF, Naive, Replay

    def quiet_evaluator() -> EvaluationPlugin:  # a fresh one per strategy, no metrics, no loggers
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return EvaluationPlugin(loggers=[])

    common = dict(criterion=nn.CrossEntropyLoss(), train_mb_size=BATCH, train_epochs=1, eval_mb_size=512,
                  device="cpu", evaluator=quiet_evaluator)
    return {
        "Avalanche Naive": lambda m, o: Naive(model=m, optimizer=o, **common),
        "Avalanche Replay": lambda m, o: Replay(model=m, optimizer=o, mem_size=BUFFER, **common),
        "Avalanche DER++": lambda m, o: DER(model=m, optimizer=o, mem_size=BUFFER, alpha=0.1, beta=0.5, **common),
        "Avalanche EWC": lambda m, o: EWC(model=m, optimizer=o, ewc_lambda=100.0, **common),
        "Avalanche LwF": lambda m, o: LwF(model=m, optimizer=o, alpha=1.0, temperature=2.0, **common),
    }


def run_avalanche(name: str, make: Callable[[nn.Module, torch.optim.Optimizer], Any], dm: SplitMNIST
                  ) -> dict[str, Any]:
    """Trains with Avalanche's loop; returns the summary, matrix and wall time (training and our
    evaluation after each experience, as in a Lightning ``fit``)."""
    model = SmallCNN(in_channels=1, num_classes=10, width=WIDTH)
    strategy = make(model, torch.optim.SGD(model.parameters(), lr=LR))
    matrix = []
    start = time.perf_counter()
    for i, experience in enumerate(dm.benchmark.train_stream):
        strategy.train(experience, num_workers=0)
        matrix.append(accuracy_row(model, dm, i))
    wall = time.perf_counter() - start
    return {**continual_summary(matrix)["final"], "wall_s": wall, "matrix": matrix}


def ours() -> dict[str, Callable[[], list[pl.Callback]]]:
    return {
        "ours: naive": lambda: [],
        "ours: ExperienceReplay": lambda: [ExperienceReplay(buffer_size=BUFFER)],
        "ours: ExperienceReplay (past_only)": lambda: [ExperienceReplay(buffer_size=BUFFER, past_only=True)],
        "ours: k-FPF-CE": lambda: [KFPF(k=2, iterations=175, buffer_size=BUFFER, lr=0.1, momentum=0.9)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--markdown", type=str, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    load_mnist_tensors(None)  # decode once, outside the timed runs
    peers = avalanche_strategies()
    mine = ours()
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:  # seeds outermost: methods interleave, so machine load drifts hit all alike
        for name in [*mine, *peers]:
            pl.seed_everything(seed, verbose=False)
            dm = SplitMNIST(n_experiences=5, epochs_per_experience=1, batch_size=BATCH, seed=seed)
            if name in mine:
                model = ContinualClassifier("small_cnn", num_classes=10, in_channels=1, lr=LR,
                                            backbone_kwargs={"width": WIDTH})
                res = run_stream(model, dm, mine[name]())
            else:
                dm.setup("fit")
                res = run_avalanche(name, peers[name], dm)
            results.setdefault(name, []).append(res)
            print(f"{name:36s} seed {seed}: avg acc {res['avg_acc']:.4f}  forgetting {res['avg_forgetting']:.4f}  "
                  f"wall {res['wall_s']:.1f}s", flush=True)

    naive = statistics.mean(r["wall_s"] for r in results["ours: naive"])
    header = ["method", "avg acc (%)", "forgetting (%)", "BWT (%)", "wall (s)", "time vs our naive"]
    rows = []
    for name, runs in results.items():
        wall = statistics.mean(r["wall_s"] for r in runs)
        rows.append([name, mean_std([r["avg_acc"] for r in runs], 100),
                     mean_std([r["avg_forgetting"] for r in runs], 100), mean_std([r["bwt"] for r in runs], 100),
                     f"{wall:.1f}", f"{wall / naive:.2f}x"])
    table = markdown_table(header, rows)
    print(table)
    if args.markdown:
        write_markdown(args.markdown, f"Ours beside Avalanche 0.6 on Split-MNIST, class-IL ({len(args.seeds)} seed(s))",
                       table)


if __name__ == "__main__":
    main()
