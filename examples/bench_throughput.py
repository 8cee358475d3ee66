"""Training throughput of plain Lightning training and of the continual stream with each plugin, on a timm ViT.

Model: timm's ``vit_tiny_patch16_224`` (random init) at ``--img-size`` 32 with ``--patch-size`` 4 (64 patches
and the class token), ``ContinualClassifier`` with AdamW. Data: a synthetic stream shaped as Split-CIFAR-10
(random 3 x 32 x 32 images, 10 classes in 5 experiences of 2), built with ``ContinualDataModule(benchmark=...)``
over an Avalanche benchmark of tensors, sized so that the stream has ``--warmup`` + ``--steps`` training
steps (rounded up to whole experiences); nothing is downloaded.

Rows: ``plain`` is the same module and data without the continual machinery (a plain ``DataLoader`` over the
same samples, one epoch, no stream datamodule); ``naive`` is the stream with no callback; the others are the
stream with one plugin at its constructor defaults (k-FPF's phase length is ``--kfpf-iterations``).
Validation is off (``limit_val_batches=0``): only training is measured.

Throughput: a callback first in ``callbacks=[...]`` (and its closing half last) times every training step
from ``on_train_batch_start`` to ``on_train_batch_end``: every callback's batch hooks (replay's buffer
sampling, ...), the forward, the backward and the optimizer step, after the batch has been moved to the
device (data loading is not timed); on CUDA the device is synchronized at both ends. The first ``--warmup``
steps of each fit, partial batches and steps in which k-FPF ran a phase are left out; samples/s is the
number of the loader's samples of the timed steps (replayed samples do not count: replay's extra work shows
as a lower throughput) over their total time. With ``--rounds R`` every method trains R times, round-robin,
and the table gives the median. k-FPF's phases (``k`` per stream, at its schedule) are reported below the
table, outside the steady-state figure.

    python examples/bench_throughput.py --accelerator gpu --precision bf16-mixed --batch-size 128 --steps 200 \\
        --rounds 3 --markdown runs/throughput_gpu.md
    OMP_NUM_THREADS=1 python examples/bench_throughput.py --accelerator cpu --batch-size 8 --steps 10 \\
        --warmup 2 --kfpf-iterations 5   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import KFPF, L2M, PEGO, DRTune, ExperienceReplay, LoRAMoE  # noqa: E402
from cl_plugins import ContinualClassifier  # noqa: E402
from datamodules import ContinualDataModule  # noqa: E402
from datamodules.common import split_benchmark  # noqa: E402
from examples.benchutils import markdown_table, write_markdown  # noqa: E402

NUM_CLASSES = 10
PLAIN = "plain"
#: the plugins, each a factory of its callbacks (``None``: plain training without the stream)
METHODS: dict[str, Callable[[argparse.Namespace], list[pl.Callback]] | None] = {
    PLAIN: None,
    "naive": lambda a: [],
    "ExperienceReplay": lambda a: [ExperienceReplay()],
    "KFPF": lambda a: [KFPF(iterations=a.kfpf_iterations)],
    "DRTune": lambda a: [DRTune()],
    "PEGO": lambda a: [PEGO()],
    "LoRAMoE": lambda a: [LoRAMoE()],
    "L2M": lambda a: [L2M()],
}


class StepTimer(pl.Callback):
    """Times training steps: ``StepTimer(...)`` goes first in ``callbacks=[...]`` and its :attr:`end` last.

    Keeps the steps after the first ``warmup`` of the fit whose loader batch is full (``batch_size``
    samples) and during which ``phases()`` (when given: a count of extra phases, k-FPF's) did not change;
    the latter go to :attr:`phase_times`.
    """

    def __init__(self, warmup: int, batch_size: int, phases: Callable[[], int] | None = None) -> None:
        self.warmup = warmup
        self.batch_size = batch_size
        self.phases = phases
        self.times: list[float] = []
        self.samples: list[int] = []
        self.phase_times: list[float] = []
        self.seen = 0
        self._start = 0.0
        self._n = 0
        self._phases = 0
        self._cuda = False
        self.note: str | None = None  # set by the caller (k-FPF's phases)
        self.end = _StepTimerEnd(self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cuda = pl_module.device.type == "cuda"

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._n = len(batch[1])  # the loader's samples, before a plugin extends the batch
        self._phases = self.phases() if self.phases else 0
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        elapsed = time.perf_counter() - self._start
        self.seen += 1
        if self.phases is not None and self.phases() != self._phases:
            self.phase_times.append(elapsed)
        elif self.seen > self.warmup and self._n == self.batch_size:
            self.times.append(elapsed)
            self.samples.append(self._n)

    @property
    def samples_per_s(self) -> float:
        return sum(self.samples) / sum(self.times) if self.times else float("nan")


class _StepTimerEnd(pl.Callback):
    """The closing half of :class:`StepTimer` (put last)."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.timer.stop()


def synthetic_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images, Split-CIFAR-10-shaped: ``--experiences`` experiences of whole batches each, the
    classes balanced; a small test set (the stream needs one; validation is off)."""
    steps_per_exp = math.ceil((args.warmup + args.steps) / args.experiences)
    per_class = math.ceil(args.batch_size * steps_per_exp * args.experiences / NUM_CLASSES)
    g = torch.Generator().manual_seed(args.seed)
    shape = (3, args.img_size, args.img_size)
    train_y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    test_y = torch.arange(NUM_CLASSES).repeat_interleave(2)
    train_x = torch.randn(len(train_y), *shape, generator=g)
    return train_x, train_y, torch.randn(len(test_y), *shape, generator=g), test_y


def make_model(args: argparse.Namespace) -> ContinualClassifier:
    kw: dict[str, Any] = dict(img_size=args.img_size, patch_size=args.patch_size)
    if args.depth is not None:
        kw["depth"] = args.depth
    return ContinualClassifier(f"timm:{args.model}", num_classes=NUM_CLASSES, in_channels=3,
                               input_shape=(3, args.img_size, args.img_size), backbone_kwargs=kw,
                               optimizer="adamw", lr=args.lr)


def run_method(name: str, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> StepTimer:
    """One fit of ``name`` on a fresh model; returns its timer."""
    pl.seed_everything(args.seed, verbose=False)
    model = make_model(args)
    factory = METHODS[name]
    callbacks = factory(args) if factory is not None else []
    kfpf = next((cb for cb in callbacks if isinstance(cb, KFPF)), None)
    timer = StepTimer(args.warmup, args.batch_size, phases=(lambda: kfpf.phases_done) if kfpf else None)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[timer, *callbacks, timer.end], **({"max_epochs": 1} if factory is None else {}))
    train_x, train_y, test_x, test_y = data
    if factory is None:
        dataset = TensorDataset(train_x, train_y, torch.zeros_like(train_y))
        trainer.fit(model, train_dataloaders=DataLoader(dataset, batch_size=args.batch_size, shuffle=True))
    else:
        bm = split_benchmark(train_x, train_y, test_x, test_y, n_experiences=args.experiences,
                             class_order=list(range(NUM_CLASSES)))
        trainer.fit(model, datamodule=ContinualDataModule(benchmark=bm, batch_size=args.batch_size, seed=args.seed))
    if kfpf is not None:
        timer.note = (f"{kfpf.phases_done} phase(s) of {kfpf.iterations} iterations (batch {kfpf.batch_size}) "
                           f"took {sum(timer.phase_times):.2f} s in the steps that ran them")
    return timer


def device_name(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision, e.g. bf16-mixed, 16-mixed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per method (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="steps at the start of each fit left out")
    parser.add_argument("--rounds", type=int, default=1, help="fits per method, round-robin; the median is reported")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--depth", type=int, default=None, help="override the ViT's depth (default: the model's)")
    parser.add_argument("--experiences", type=int, default=5, help="experiences of the stream (divides 10)")
    parser.add_argument("--kfpf-iterations", type=int, default=175, help="iterations of each k-FPF phase")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=str, default=None, help="write the table to this file")
    args = parser.parse_args()
    chosen = args.methods or list(METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if NUM_CLASSES % args.experiences:
        parser.error(f"--experiences must divide {NUM_CLASSES}")
    if PLAIN not in chosen:
        chosen.insert(0, PLAIN)  # the reference column
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*`max_epochs` was not set.*",  # the stream sets it
                    ".*no `val_dataloader`.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message)

    data = synthetic_data(args)
    reference = make_model(args)
    params = sum(p.numel() for p in reference.parameters())
    depth = len(getattr(reference.net, "blocks", ())) or "?"
    del reference
    rates: dict[str, list[float]] = {name: [] for name in chosen}
    step_ms: dict[str, list[float]] = {name: [] for name in chosen}
    timed: dict[str, int] = {}
    kfpf_note: str | None = None
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for name in chosen:
            timer = run_method(name, args, data)
            if not timer.times:
                raise SystemExit(f"{name}: no step was timed; raise --steps or lower --warmup")
            rates[name].append(timer.samples_per_s)
            step_ms[name].append(1e3 * statistics.median(timer.times))
            timed[name] = len(timer.times)
            kfpf_note = timer.note or kfpf_note
            print(f"{name:16s} {timer.samples_per_s:10.1f} samples/s  median step {step_ms[name][-1]:.1f} ms  "
                  f"({len(timer.times)} steps timed)", flush=True)

    plain = statistics.median(rates[PLAIN])
    rows = []
    for name in chosen:
        rate = statistics.median(rates[name])
        rows.append([name, args.precision, f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}", f"{rate / plain:.2f}x"])
    text = markdown_table(["method", "precision", "samples/s", "relative to plain"], rows)
    settings = (f"{args.model} ({depth} blocks, {params / 1e6:.2f}M parameters) at {args.img_size} px, "
                f"patch {args.patch_size}; batch {args.batch_size}, AdamW; synthetic Split-CIFAR-10-shaped stream "
                f"({args.experiences} experiences); {device_name(args.accelerator)}; {args.warmup} warm-up step(s) per "
                f"fit, about {max(timed.values())} timed steps per method, {args.rounds} round(s), median; torch "
                f"{torch.__version__}, lightning {lightning.__version__}; total {time.perf_counter() - t0:.0f} s")
    if kfpf_note:
        text += f"\n\nKFPF, outside the steady-state steps: {kfpf_note}" + (" (last round)" if args.rounds > 1 else "")
    print(text)
    print(settings)
    if args.markdown:
        write_markdown(args.markdown, f"Training throughput, {args.model} at {args.img_size} px, {args.precision}, "
                       f"{device_name(args.accelerator)}", f"{text}\n\n{settings}")


if __name__ == "__main__":
    main()
