"""The plugin's overhead in the Seq-MNIST setting of the DER paper, beside plain PyTorch, plain Lightning
and Avalanche 0.6, all in one run.

Setting (Buzzega et al. 2020, Seq-MNIST): MNIST split into 5 class-incremental tasks of 2 digits, an MLP
784-100-100-10, SGD with lr 0.1, batch 10, one epoch per task (6,000 training steps), replay from a 500-sample
reservoir with a replay batch of 10. After each task every row evaluates all 5 test tasks (masking the classes
not trained yet, as ``ContinualClassificationMixin`` does), so each run fills a 5 x 5 accuracy matrix.

Rows (each trains the same network from the same initialization):

- ``torch``: a plain PyTorch loop over per-task ``TensorDataset`` loaders of the normalized images (the floor);
  ``torch+replay``: the same with a reservoir buffer (Vitter's algorithm R, batch extended by 10 samples);
- ``lightning``: a plain ``LightningModule`` and one ``Trainer.fit`` over the same per-task tensors (a
  ``LightningDataModule`` returning task ``current_epoch``'s loader, reloaded every epoch), validating the 5
  per-task test loaders after each task (accuracy through ``self.log``); no step logging of its own;
- ``naive``: ours at its defaults: ``datamodules.SplitMNIST`` + ``ContinualClassifier`` + ``ContinualMetrics``;
  ``ER``: the same with ``callbacks.ExperienceReplay(500, replay_batch_size=10)``;
- ``avalanche-naive`` / ``avalanche-replay``: Avalanche 0.6's ``Naive`` strategy (without and with
  ``ReplayPlugin(mem_size=500, batch_size_mem=10)``) on the same Avalanche benchmark our stream wraps, evaluated
  after each task by the plain loop's evaluation.

Timed: ``trainer.fit`` for the Lightning rows (Trainer construction and the stream's benchmark split, which every
row shares, are not timed), the training plus per-task evaluation loop for the others. The plain rows evaluate
with batch ``--eval-batch-size``; our stream runs at its defaults (its ``eval_batch_size`` default included).
All Lightning rows: ``logger=False``, no checkpointing, progress bar or model summary, no sanity check.
With ``--rounds R`` the rows run R times round-robin in one process; the table gives the median wall time, the
smallest CPU time of the process over the rounds (on a shared machine the CPU time of these single-threaded runs is
what they cost, the wall time also counts waiting for a core, and other load only ever adds to either: the
smallest is the least disturbed) and their ratios, computed within this run. ``--import-runs N``
also times ``import lightning.pytorch`` and ``import callbacks`` in N fresh interpreters each (median).

    OMP_NUM_THREADS=1 python examples/bench_overhead.py --rounds 3 --import-runs 5
    OMP_NUM_THREADS=1 python examples/bench_overhead.py --rows lightning naive --profile naive  # cProfile
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import logging
import pstats
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks import ExperienceReplay  # noqa: E402
from callbacks.metrics import ContinualMetrics  # noqa: E402
from cl_plugins import ContinualClassifier, build_backbone  # noqa: E402
from cl_plugins.metrics import continual_summary  # noqa: E402
from datamodules import SplitMNIST  # noqa: E402
from datamodules.mnist import MNIST_MEAN, MNIST_STD, load_mnist_tensors  # noqa: E402
from examples.benchutils import markdown_table, write_markdown  # noqa: E402

N_TASKS, CLASSES_PER_TASK, NUM_CLASSES = 5, 2, 10
BACKBONE = dict(hidden=100, depth=2)  # MLP 784-100-100-10


# ----------------------------------------------------------------------------- data of the plain rows
class PlainData:
    """Per-task float tensors of Split-MNIST (the normalization of ``SplitMNIST``), classes {0,1}, {2,3}, ..."""

    def __init__(self) -> None:
        tx, ty, vx, vy = load_mnist_tensors()
        mean, std = MNIST_MEAN[0], MNIST_STD[0]

        def norm(x: Tensor) -> Tensor:
            return (x.float().div_(255.0) - mean) / std

        self.train: list[tuple[Tensor, Tensor]] = []
        self.test: list[tuple[Tensor, Tensor]] = []
        for i in range(N_TASKS):
            classes = torch.arange(i * CLASSES_PER_TASK, (i + 1) * CLASSES_PER_TASK)
            tr, te = torch.isin(ty, classes), torch.isin(vy, classes)
            self.train.append((norm(tx[tr]), ty[tr]))
            self.test.append((norm(vx[te]), vy[te]))

    def train_loader(self, task: int, batch_size: int, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed + task)
        return DataLoader(TensorDataset(*self.train[task]), batch_size=batch_size, shuffle=True, generator=g)

    def test_loaders(self, batch_size: int) -> list[DataLoader]:
        return [DataLoader(TensorDataset(*t), batch_size=batch_size) for t in self.test]


def seen_mask(trained: int, device: torch.device | str = "cpu") -> Tensor:
    """Outputs of the classes of tasks ``0..trained`` (class-IL evaluation masks the others)."""
    mask = torch.zeros(NUM_CLASSES, dtype=torch.bool, device=device)
    mask[: (trained + 1) * CLASSES_PER_TASK] = True
    return mask


@torch.no_grad()
def evaluate(model: nn.Module, loaders: list[DataLoader], trained: int) -> list[float]:
    """Accuracy on every test task after training tasks ``0..trained`` (unseen classes masked)."""
    mask = seen_mask(trained)
    was_training = model.training
    model.eval()
    row = []
    for loader in loaders:
        correct = total = 0
        for x, y in loader:
            logits = model(x).masked_fill(~mask, torch.finfo(torch.float32).min)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        row.append(correct / total)
    model.train(was_training)
    return row


class Timer:
    """Wall and CPU time (this process, all threads) of a region: on a shared machine the CPU time of a
    single-threaded run is what it cost, the wall time also counts waiting for a core."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def result(self, matrix: list[list[float]]) -> dict[str, Any]:
        return {"wall_s": self.wall, "cpu_s": self.cpu, "matrix": matrix}


def mlp() -> nn.Module:
    return build_backbone("mlp", NUM_CLASSES, input_shape=(1, 28, 28), **BACKBONE)


# ----------------------------------------------------------------------------- plain PyTorch
class PlainReservoir:
    """Reservoir sampling (Vitter's algorithm R) over preallocated tensors, Python RNG for the slots."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.seen = capacity, 0
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.x = torch.zeros(capacity, 1, 28, 28)
        self.y = torch.zeros(capacity, dtype=torch.long)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: Tensor, y: Tensor) -> None:
        slots, rows = [], []
        for i in range(len(y)):
            self.seen += 1
            slot = self.seen - 1 if self.seen <= self.capacity else self.rng.randrange(self.seen)
            if slot < self.capacity:
                slots.append(slot)
                rows.append(i)
        if slots:
            self.x[slots] = x[rows]
            self.y[slots] = y[rows]

    def sample(self, k: int) -> tuple[Tensor, Tensor]:
        idx = torch.randperm(len(self), generator=self.gen)[:k]
        return self.x[idx], self.y[idx]


def run_torch(data: PlainData, args: argparse.Namespace, replay: bool) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    buffer = PlainReservoir(args.buffer_size, args.seed) if replay else None
    test = data.test_loaders(args.eval_batch_size)
    matrix = []
    with Timer() as timer:
        run_torch_loop(model, opt, buffer, data, test, matrix, args)
    return timer.result(matrix)


def run_torch_loop(model: nn.Module, opt: torch.optim.Optimizer, buffer: PlainReservoir | None, data: PlainData,
                   test: list[DataLoader], matrix: list[list[float]], args: argparse.Namespace) -> None:
    for task in range(N_TASKS):
        model.train()
        for x, y in data.train_loader(task, args.batch_size, args.seed):
            xb, yb = x, y
            if buffer is not None and len(buffer):
                mx, my = buffer.sample(args.replay_batch_size)
                xb, yb = torch.cat([x, mx]), torch.cat([y, my])
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if buffer is not None:
                buffer.add(x, y)
        matrix.append(evaluate(model, test, task))


# ----------------------------------------------------------------------------- plain Lightning
class PlainModule(pl.LightningModule):
    """What a Lightning user writes for this stream: no step logging, per-task validation accuracy."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = mlp()
        self.lr = lr
        self._mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_validation_epoch_start(self) -> None:
        self._mask = seen_mask(self.current_epoch, self.device)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self(x).masked_fill(~self._mask, torch.finfo(torch.float32).min)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"acc_task{dataloader_idx}", acc, batch_size=len(y), add_dataloader_idx=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class PlainTasks(pl.LightningDataModule):
    """Task ``current_epoch``'s training loader (reloaded every epoch) and the 5 test loaders."""

    def __init__(self, data: PlainData, args: argparse.Namespace) -> None:
        super().__init__()
        self.data, self.args = data, args

    def train_dataloader(self) -> DataLoader:
        return self.data.train_loader(self.trainer.current_epoch, self.args.batch_size, self.args.seed)

    def val_dataloader(self) -> list[DataLoader]:
        return self.data.test_loaders(self.args.eval_batch_size)


class _Rows(pl.Callback):
    """Reads the per-task accuracies the plain module logged (validation runs before the epoch ends)."""

    def __init__(self) -> None:
        self.matrix: list[list[float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        self.matrix.append([float(m[f"acc_task{j}"]) for j in range(N_TASKS)])


def trainer_kwargs() -> dict[str, Any]:
    return dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)


def run_lightning(data: PlainData, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    model = PlainModule(args.lr)
    rows = _Rows()
    trainer = pl.Trainer(max_epochs=N_TASKS, reload_dataloaders_every_n_epochs=1, callbacks=[rows],
                         **trainer_kwargs())
    with Timer() as timer:
        trainer.fit(model, datamodule=PlainTasks(data, args))
    return timer.result(rows.matrix)


# ----------------------------------------------------------------------------- ours
def split_mnist(args: argparse.Namespace) -> SplitMNIST:
    """Our stream at its defaults (batch size and seed given); the benchmark split is built before timing."""
    dm = SplitMNIST(n_experiences=N_TASKS, batch_size=args.batch_size, seed=args.seed)
    _ = dm.benchmark
    return dm


def run_ours(args: argparse.Namespace, replay: bool) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    dm = split_mnist(args)
    model = ContinualClassifier("mlp", num_classes=NUM_CLASSES, backbone_kwargs=BACKBONE, optimizer="sgd",
                                lr=args.lr)
    out = tempfile.mkdtemp(prefix="bench_overhead_")
    metrics = ContinualMetrics(output_dir=out)
    callbacks: list[pl.Callback] = [metrics]
    if replay:
        callbacks.insert(0, ExperienceReplay(args.buffer_size, replay_batch_size=args.replay_batch_size,
                                             seed=args.seed))
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs())
    with Timer() as timer:
        trainer.fit(model, datamodule=dm)
    return timer.result(metrics.matrix)


# ----------------------------------------------------------------------------- Avalanche
def run_avalanche(data: PlainData, args: argparse.Namespace, replay: bool) -> dict[str, Any]:
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

    dm = split_mnist(args)
    torch.manual_seed(args.seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    plugins = [ReplayPlugin(mem_size=args.buffer_size, batch_size_mem=args.replay_batch_size)] if replay else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=args.batch_size,
                         train_epochs=1, eval_mb_size=args.eval_batch_size, device="cpu", plugins=plugins,
                         evaluator=lambda: EvaluationPlugin(loggers=[]))
    test = data.test_loaders(args.eval_batch_size)
    matrix = []
    with Timer() as timer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for task, experience in enumerate(dm.benchmark.train_stream):
            strategy.train(experience, num_workers=0)
            matrix.append(evaluate(model, test, task))
    return timer.result(matrix)


# ----------------------------------------------------------------------------- the table
ROWS: dict[str, Callable[[PlainData, argparse.Namespace], dict[str, Any]]] = {
    "torch": lambda d, a: run_torch(d, a, replay=False),
    "torch+replay": lambda d, a: run_torch(d, a, replay=True),
    "lightning": run_lightning,
    "naive": lambda d, a: run_ours(a, replay=False),
    "ER": lambda d, a: run_ours(a, replay=True),
    "avalanche-naive": lambda d, a: run_avalanche(d, a, replay=False),
    "avalanche-replay": lambda d, a: run_avalanche(d, a, replay=True),
}
DESCRIPTIONS = {
    "torch": "plain PyTorch loop (floor)",
    "torch+replay": "plain PyTorch loop + reservoir replay",
    "lightning": "plain LightningModule + Trainer",
    "naive": "ours: SplitMNIST + ContinualClassifier + ContinualMetrics",
    "ER": "ours: + ExperienceReplay(500, replay batch 10)",
    "avalanche-naive": "Avalanche 0.6 Naive",
    "avalanche-replay": "Avalanche 0.6 Naive + ReplayPlugin(500, 10)",
}


def import_seconds(statement: str, runs: int) -> tuple[float, float]:
    """Median wall time and smallest CPU time (user + system) of ``python -c statement`` in ``runs`` fresh
    interpreters (interpreter start included, the same for the statements compared)."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], cwd=ROOT, check=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), min(cpus)


def profile_row(name: str, data: PlainData, args: argparse.Namespace) -> None:
    """One run of ``name`` under cProfile; prints the top functions by cumulative and by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    result = ROWS[name](data, args)
    profiler.disable()
    if args.profile_out:
        profiler.dump_stats(args.profile_out)
    print(f"\n## cProfile of {name} (wall {result['wall_s']:.1f} s under the profiler)")
    for key in ("cumulative", "tottime"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(args.profile_top)
        print(stream.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rounds", type=int, default=1, help="runs per row, round-robin; the median is reported")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--eval-batch-size", type=int, default=1000, help="evaluation batch of the plain rows")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--buffer-size", type=int, default=500)
    parser.add_argument("--replay-batch-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--import-runs", type=int, default=0, help="fresh interpreters per import timing (0: skip)")
    parser.add_argument("--profile", choices=list(ROWS), default=None, help="also profile one run of this row")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--profile-out", default=None, help="also dump the profile's stats to this file")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    data = PlainData()
    walls: dict[str, list[float]] = {name: [] for name in args.rows}
    cpus: dict[str, list[float]] = {name: [] for name in args.rows}
    accs: dict[str, list[float]] = {name: [] for name in args.rows}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for name in args.rows:
            result = ROWS[name](data, args)
            walls[name].append(result["wall_s"])
            cpus[name].append(result["cpu_s"])
            accs[name].append(continual_summary(result["matrix"])["final"]["avg_acc"])
            print(f"round {r}: {name:17s} wall {result['wall_s']:7.2f} s  CPU {result['cpu_s']:7.2f} s  "
                  f"avg acc {100 * accs[name][-1]:.2f}%", flush=True)

    med = {name: statistics.median(w) for name, w in walls.items()}
    cpu = {name: min(c) for name, c in cpus.items()}
    ref, cpu_ref = med.get("lightning"), cpu.get("lightning")
    rows = []
    for name in args.rows:
        rows.append([name, DESCRIPTIONS[name], f"{med[name]:.2f}", f"{med[name] / ref:.2f}x" if ref else "-",
                     f"{cpu[name]:.2f}", f"{cpu[name] / cpu_ref:.2f}x" if cpu_ref else "-",
                     f"{100 * statistics.median(accs[name]):.2f}"])
    text = markdown_table(["row", "what", "wall (s), median", "wall vs plain Lightning", "CPU (s), min",
                           "CPU vs plain Lightning", "avg acc (%)"], rows)
    notes = []
    if "ER" in med and "avalanche-replay" in med:
        notes.append(f"ER / Avalanche Naive+Replay: {med['ER'] / med['avalanche-replay']:.2f}x wall, "
                     f"{cpu['ER'] / cpu['avalanche-replay']:.2f}x CPU")
    if "naive" in med and ref:
        notes.append(f"naive / plain Lightning: {med['naive'] / ref:.2f}x wall, {cpu['naive'] / cpu_ref:.2f}x CPU")
    if args.import_runs:
        base_wall, base_cpu = import_seconds("import lightning.pytorch", args.import_runs)
        ours_wall, ours_cpu = import_seconds("import callbacks", args.import_runs)
        notes.append(f"import: `import lightning.pytorch` {base_wall:.2f} s wall / {base_cpu:.2f} s CPU, "
                     f"`import callbacks` {ours_wall:.2f} s / {ours_cpu:.2f} s (+{ours_wall - base_wall:.2f} s wall, "
                     f"+{ours_cpu - base_cpu:.2f} s CPU; {args.import_runs} fresh interpreters each, median wall, "
                     "smallest CPU)")
    settings = (f"Seq-MNIST (5 x 2 classes, class-IL), MLP 784-100-100-10, SGD lr {args.lr}, batch {args.batch_size}, "
                f"1 epoch per task, buffer {args.buffer_size} / replay batch {args.replay_batch_size}; plain rows "
                f"evaluate at batch {args.eval_batch_size}; {args.rounds} round(s), median; "
                f"{torch.get_num_threads()} torch thread(s); torch {torch.__version__}, "
                f"lightning {lightning.__version__}; "
                f"{datetime.date.today().isoformat()}; total {time.perf_counter() - t0:.0f} s")
    print()
    print(text)
    print()
    for note in notes:
        print(note)
    print(settings)
    if args.markdown:
        write_markdown(args.markdown, "Overhead in the Seq-MNIST setting", "\n\n".join([text, *notes, settings]))
    if args.profile:
        profile_row(args.profile, data, args)


if __name__ == "__main__":
    main()
