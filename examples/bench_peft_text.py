"""Parameter-efficient continual learning on the text stream: full fine-tuning, LoRA, PEGO, LoRAMoE, L2M.

Stream: AG News -> Yelp -> Amazon -> DBpedia (``datamodules.TextCLStream``, 4 + 5 + 5 + 14 = 28
classes), pretrained all-MiniLM-L6-v2 (``ContinualClassifier("hf:<local folder>")``, nothing is
downloaded), max_length 64, class-balanced subsets of 2000 training and 1000 test samples per task
(fixed subset seed; Yelp's and DBpedia's test sets come from the stream's fixed-seed 80/20 split),
1 epoch per experience (125 steps of batch 16), AdamW. Full fine-tuning (no callback) trains every
weight; the four methods freeze the encoder and train their modules and the classification head,
with each callback's constructor defaults.

Why this budget. With 200 test samples per task each accuracy carried about +-3.5 points (binomial
standard error at 50-85%), as large as the differences between methods; 1000 per task bring it to
about +-1.5. At 1000 training samples (63 steps) full fine-tuning forgot 6.8 +- 3.5% (5 seeds), in
places less than the adapters; 2000 samples per task (125 steps) at AdamW 5e-5 (the top of the
2e-5..5e-5 range users fine-tune BERT-size encoders with) makes it forget clearly (AG News drops 11
points after Yelp alone on seed 0). Evaluation is inference only, with batch 256, and the test
experiences not trained yet are evaluated on 32 samples only (``SeenTestEvaluation``; no reported
figure reads the matrix's upper triangle; ``--full-matrix`` evaluates all). The estimated cost of
one seed of all five methods on 2 otherwise idle cores is under 30 minutes (training steps of
0.3-0.5 s, about 12 ms per evaluated sample); the measured wall time and CPU time are printed.

Scenario: task-incremental by default (``--scenario task``), the usual protocol for this
benchmark in the PEFT continual-learning papers, and the one that isolates the forgetting of the
*encoder*: logits are masked to the task's classes in training and evaluation, so accuracy on an
old task drops only when the representation the old task's head reads has drifted, not because
the shared head is biased toward the newest classes (which in class-IL dominates every method that
has no replay, adapters included). Class-IL: ``--scenario class --replay-buffer 500`` runs every
chosen method with ``ExperienceReplay`` (rows "<method> + ER"; "full fine-tuning + ER" is replay
alone on the full model); without ``--replay-buffer`` the same methods run without replay.
``--replay-buffer`` works in task-IL too (LoRAMoE's documented use in a stream: replayed samples of
the first experience are its knowledge-typed data, see docs/methods/loramoe-in-a-stream.md).

Learning rates: AdamW 5e-5 for full fine-tuning; for the adapter methods, the learning rate times
the method's update scale ``alpha / r`` is the same, 2e-3 (Adam's steps are about ``lr`` per
factor entry, so the weight update moves at ``lr * alpha / r``): LoRA (alpha 16, r 8) and L2M
(alpha 2r) 1e-3, PEGO (alpha = r) 2e-3, LoRAMoE (alpha 32, r 4) 2.5e-4. Not tuned on this stream
(``--lr-full``, ``--lr-adapter`` (the scale-2 value), ``--lr METHOD=LR`` override them).
``--methods`` also takes the variants ``"L2M frozen head"`` (``train_head=False``, as upstream) and
``"L2M gradient keys"`` (``key_update="gradient"``, upstream's key learning).

Columns: final average accuracy, average forgetting and BWT (``callbacks.ContinualMetrics``),
trainable parameters (after the callbacks' injection), the median training step time
(``on_train_batch_start`` -> ``on_train_batch_end``: forward, every callback's batch hooks,
backward and the optimizer step; the first ``--warmup-steps`` steps of every experience are left
out) and its ratio to full fine-tuning and to LoRA, the wall time of ``fit`` and the process CPU
time. Issue targets (reported as met or not): average forgetting at most half of full
fine-tuning's at an average accuracy at least full fine-tuning's; step time at most 1.3x LoRA's.
For L2M, the share of each test experience's samples that select a key its training experience
selected (``L2M.eval_key_match``). ``--l2m-keys-only`` computes that share for both key updates
from the keys alone (the keys depend on the frozen queries only: seconds per seed, no training of
the model; ``train_keys`` reproduces the callback's keys exactly, see ``tests/test_text_bench.py``).

Knowledge probe (``examples/knowledge_probe.py``): 30 hand-written sentence pairs; the similarity
is the cosine of the masked mean of the encoder's last hidden states, computed by running the
*trained* module (so merged LoRA / PEGO weights, LoRAMoE's routed experts and L2M's selected pool
entries all apply; L2M selects each probe sentence's entry from its own frozen-embedding query with
plain cosine, as at test time). Reported: Spearman correlation of the 30 scores with those of the
pretrained MiniLM, their mean absolute change, and the Spearman correlation with the hand grades.

Regenerate the tables:

    OMP_NUM_THREADS=2 python examples/bench_peft_text.py --seeds 0 1 2 3 4 --markdown runs/peft_text.md
    OMP_NUM_THREADS=2 python examples/bench_peft_text.py --scenario class --replay-buffer 500 --no-probe
    OMP_NUM_THREADS=2 python examples/bench_peft_text.py --scenario class --methods "full fine-tuning" --no-probe
    OMP_NUM_THREADS=1 python examples/bench_peft_text.py --l2m-keys-only --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

# the repository root first, so that ``examples`` is this folder and not the top-level ``examples`` package
# that avalanche-lib installs
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import L2M, PEGO, DRTune, ExperienceReplay, LoRA, LoRAMoE  # noqa: E402
from cl_plugins import ContinualClassifier  # noqa: E402
from cl_plugins.peft.l2m import (  # noqa: E402
    ModulationPool,
    find_pad_token_id,
    find_query_module,
    find_query_tap,
    masked_token_mean,
)
from datamodules import TextCLStream  # noqa: E402
from datamodules.text import default_tokenizer_path  # noqa: E402
from examples import knowledge_probe as probe  # noqa: E402
from examples.benchutils import code_revision, markdown_table, mean_std, run_stream, write_markdown  # noqa: E402

METHODS: dict[str, Callable[[], list[pl.Callback]]] = {
    "full fine-tuning": lambda: [],
    "LoRA": lambda: [LoRA()],
    "PEGO": lambda: [PEGO()],
    "LoRAMoE": lambda: [LoRAMoE()],
    "L2M": lambda: [L2M()],
}
#: variants run only when named in --methods (the ablations of docs/methods/l2m-key-selection.md)
VARIANTS: dict[str, tuple[str, Callable[[], list[pl.Callback]]]] = {
    "L2M frozen head": ("L2M", lambda: [L2M(train_head=False)]),
    "L2M gradient keys": ("L2M", lambda: [L2M(key_update="gradient")]),
    # full fine-tuning (its learning rate) with DR-Tune's regularizer at its defaults
    "DR-Tune": ("full fine-tuning", lambda: [DRTune()]),
}
FULL, BASELINE = "full fine-tuning", "LoRA"
#: the benchmark's budget (see the module docstring)
DEFAULT_TRAIN_PER_TASK = 2000
DEFAULT_TEST_PER_TASK = 1000
#: alpha / r of each adapter method's defaults (LoRA 16 / 8, PEGO alpha = r, LoRAMoE 32 / 4, L2M 2r / r)
ADAPTER_SCALE = {"LoRA": 2.0, "PEGO": 1.0, "LoRAMoE": 8.0, "L2M": 2.0}


def base_method(name: str) -> str:
    """The method a variant belongs to (its learning rate and its place in the table)."""
    return VARIANTS[name][0] if name in VARIANTS else name


def method_callbacks(name: str) -> list[pl.Callback]:
    """Fresh callbacks of a method or variant."""
    return VARIANTS[name][1]() if name in VARIANTS else METHODS[name]()


class SeenTestEvaluation:
    """Mixin for a ``ContinualDataModule``: the evaluation after experience ``i`` runs the full test sets of
    experiences ``0..i`` only; the test experiences not trained yet get their first ``unseen_samples``
    samples. The accuracy matrix's upper triangle is then a rough estimate, which no reported figure reads
    (average accuracy is the last row, forgetting and BWT the diagonal and below; forward transfer needs the
    untrained model's evaluation, off by default): 6 of the 16 evaluation passes of a 4-task stream saved."""

    unseen_samples: int = 32

    def val_dataloader(self) -> list[DataLoader]:
        trainer = self.trainer  # type: ignore[attr-defined]
        if trainer is None or trainer.sanity_checking:
            return super().val_dataloader()  # type: ignore[misc]
        current = self.current_experience  # type: ignore[attr-defined]
        loaders = []
        for j in range(self.num_test_experiences):  # type: ignore[attr-defined]
            data = self.test_dataset(j)  # type: ignore[attr-defined]
            if j > current:
                data = Subset(data, range(min(self.unseen_samples, len(data))))
            loaders.append(self._eval_loader(data))  # type: ignore[attr-defined]
        return loaders


class SeenTestStream(SeenTestEvaluation, TextCLStream):
    """The text stream with :class:`SeenTestEvaluation`."""


class Progress(pl.Callback):
    """Prints one line per finished experience (the runs take minutes; Lightning's bar is off)."""

    def __init__(self, label: str) -> None:
        self.label, self.start = label, time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm.is_experience_end(trainer.current_epoch):
            print(f"  {self.label}: experience {dm.experience_at_epoch(trainer.current_epoch)} trained, "
                  f"{time.perf_counter() - self.start:.0f} s", flush=True)


class _StepClock:
    """Timestamps of the current step, shared by the two halves of :class:`StepTimer`."""

    def __init__(self) -> None:
        self.start = self.before_backward = self.after_backward = 0.0


class StepTimer(pl.Callback):
    """Times every training step: ``StepTimer()`` goes first in ``callbacks=[...]`` and its
    :attr:`end` last, so the time covers every callback's batch hooks, the forward, the backward
    and the optimizer step. The first ``warmup`` steps of each experience are left out. Also counts
    the trainable parameters when training starts (after the callbacks' injection)."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.clock = _StepClock()
        self.steps: list[float] = []
        self.forward: list[float] = []
        self.backward: list[float] = []
        self.trainable = 0
        self._in_epoch = 0
        self.end = _StepTimerEnd(self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_epoch = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.clock.start = time.perf_counter()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.clock.before_backward = time.perf_counter()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.after_backward = time.perf_counter()

    def record(self) -> None:
        now = time.perf_counter()
        self._in_epoch += 1
        if self._in_epoch > self.warmup:
            c = self.clock
            self.steps.append(now - c.start)
            self.forward.append(c.before_backward - c.start)
            self.backward.append(c.after_backward - c.before_backward)


class _StepTimerEnd(pl.Callback):
    """The closing half of :class:`StepTimer` (put last)."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.timer.record()


def interleaved_step_times(
    names: list[str], make_model: Callable[[str], ContinualClassifier], make_stream: Callable[[], TextCLStream],
    rounds: int, warmup: int,
) -> dict[str, list[float]]:
    """Step times measured round-robin: in each round every method trains one short experience
    (a fresh ``fit`` of the same model and callbacks) and its steps after the first ``warmup`` are
    timed with :class:`StepTimer`. Methods take turns within seconds of each other, so a change of
    machine load between the (minutes-long) benchmark runs does not bias their ratios."""
    setups = {name: (make_model(name), method_callbacks(name)) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            model, callbacks = setups[name]
            timer = StepTimer(warmup=warmup)
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                 limit_val_batches=0, callbacks=[timer, *callbacks, timer.end])
            trainer.fit(model, datamodule=make_stream())
            times[name] += timer.steps
    return times


@torch.no_grad()
def embedding_queries(model: ContinualClassifier, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """L2M's default query of every row of token ids ``x``: the masked token mean of the frozen embedding
    module's tap (MiniLM: ``embeddings.LayerNorm``, before the embedding dropout), as ``QueryHooks`` takes it,
    from the embedding module alone (no transformer layer runs)."""
    name, module = find_query_module(model, None, "bert")
    _, tap = find_query_tap(model, name, module)
    pad = find_pad_token_id(model)
    seen: list[torch.Tensor] = []
    handle = tap.register_forward_hook(lambda m, a, out: seen.append(out))
    module.eval()
    out = []
    try:
        for i in range(0, len(x), chunk):
            ids = x[i: i + chunk].long()
            seen.clear()
            module(input_ids=ids)
            out.append(masked_token_mean(seen[0], None if pad is None else ids != pad))
    finally:
        handle.remove()
    return torch.cat(out)


def train_keys(train_q: list[torch.Tensor], key_update: str, seed: int, batch_size: int, epochs: int, lr: float,
               pool_size: int = 30, init: torch.Tensor | None = None) -> tuple[ModulationPool, list[torch.Tensor]]:
    """L2M's keys trained on the stream without the rest of the model. The keys depend on the frozen queries
    only (the modulators enter neither selection nor the key update), so this is the callback's key learning
    (``tests/test_text_bench.py`` checks it against a fit), at a fraction of the cost. Per experience: the
    count penalty from the earlier experiences' counts, batches in the stream's order (one permutation per
    epoch, seeded with ``seed + epoch``, as ``ContinualDataModule``), the key update of ``key_update`` after
    each batch (``"gradient"``: Adam at ``lr`` on the keys, as the user's optimizer would). Keys start at
    ``init`` (default: the pool's U[-1, 1] draw after ``torch.manual_seed(seed)``). Returns the pool and each
    experience's selection counts."""
    torch.manual_seed(seed)
    pool = ModulationPool(pool_size, train_q[0].shape[1], key_update=key_update)  # type: ignore[arg-type]
    if init is not None:
        pool.keys.data.copy_(init)
    opt = torch.optim.Adam([pool.keys], lr=lr) if key_update == "gradient" else None
    counts: list[torch.Tensor] = []
    epoch = 0
    for q in train_q:
        pool.set_count_penalty(torch.stack(counts).sum(0) if counts else None)
        pool.train()
        mine = torch.zeros(pool_size, dtype=torch.long)
        for _ in range(epochs):
            order = torch.randperm(len(q), generator=torch.Generator().manual_seed(seed + epoch))
            epoch += 1
            for i in range(0, len(q), batch_size):
                with torch.enable_grad():
                    pool.select(q[order[i: i + batch_size]])
                    if opt is not None:
                        opt.zero_grad()
                        pool.state.pending_loss.backward()
                        opt.step()
                pool.apply_key_update()
                mine += pool.pop_counts()
                pool.clear()
        counts.append(mine)
    return pool, counts


def key_agreement(pool: ModulationPool, counts: list[torch.Tensor], test_q: list[torch.Tensor]) -> list[float]:
    """Per test experience, the share of its samples whose plain-cosine key (as at test time) is one its
    training experience selected (``L2M.eval_key_match``)."""
    pool.eval()
    with torch.no_grad():
        return [float((counts[j] > 0)[pool.select(q)[:, 0]].float().mean()) for j, q in enumerate(test_q)]


def parse_lr_overrides(items: list[str]) -> dict[str, float]:
    """``["LoRA=1e-3", ...]`` -> ``{"LoRA": 1e-3}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or (name not in METHODS and name not in VARIANTS):
            raise SystemExit(f"--lr takes METHOD=LR with METHOD in {[*METHODS, *VARIANTS]}, got {item!r}")
        out[name] = float(value)
    return out


def fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def keys_only(args: argparse.Namespace, model_path: str) -> None:
    """``--l2m-keys-only``: the key agreement table of both key updates over the seeds."""
    stream = TextCLStream(root=args.root, max_length=args.max_length, max_train_per_task=args.train_per_task,
                          max_test_per_task=args.test_per_task, subset_seed=args.subset_seed)
    encoded = stream.encoded_tasks()
    model = ContinualClassifier(f"hf:{model_path}", num_classes=len(stream.label_names))
    train_q = [embedding_queries(model, e["train_x"]) for e in encoded]
    test_q = [embedding_queries(model, e["test_x"]) for e in encoded]
    lr = args.lr_adapter
    rows = []
    for mode in ("gradient", "mean"):
        per_seed = [key_agreement(*train_keys(train_q, mode, seed, args.batch_size, args.epochs, lr), test_q)
                    for seed in args.seeds]
        for seed, res in zip(args.seeds, per_seed):
            print(f"key_update={mode} seed {seed}: " + " ".join(f"{100 * a:.1f}" for a in res), flush=True)
        rows.append([mode + (f" (Adam lr {lr:g})" if mode == "gradient" else "")]
                    + [mean_std([r[j] for r in per_seed], 100) for j in range(len(encoded))]
                    + [f"{100 * min(min(r) for r in per_seed):.1f}"])
    print(markdown_table(["key_update", *(f"{t} (%)" for t in stream.tasks), "lowest (%)"], rows))
    print(f"{args.train_per_task} train / {args.test_per_task} test per task, batch {args.batch_size}, "
          f"{args.epochs} epoch(s), pool 30, seeds {args.seeds}")


def _paired(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    by_seed = {r.get("seed"): r for r in reference}
    return [(r, by_seed[r.get("seed")]) for r in runs if r.get("seed") in by_seed]


def halves_forgetting(run: dict[str, Any], full: dict[str, Any]) -> bool:
    """The forgetting target on one seed: at most half of full fine-tuning's forgetting."""
    return run["avg_forgetting"] <= 0.5 * full["avg_forgetting"]


def matches_accuracy(run: dict[str, Any], full: dict[str, Any]) -> bool:
    """The accuracy target on one seed: at least full fine-tuning's accuracy."""
    return run["avg_acc"] >= full["avg_acc"]


def seeds_holding(runs: list[dict[str, Any]], reference: list[dict[str, Any]],
                  holds: Callable[[dict[str, Any], dict[str, Any]], bool]) -> str:
    """On how many seeds a target holds against the reference run of the same seed ("2/3 seeds")."""
    pairs = _paired(runs, reference)
    return f"{sum(holds(r, f) for r, f in pairs)}/{len(pairs)} seeds"


def paired_difference(runs: list[dict[str, Any]], reference: list[dict[str, Any]], key: str = "avg_acc") -> str:
    """Mean ± std over seeds of ``key`` minus the reference run's of the same seed, in points."""
    diffs = [100 * (r[key] - f[key]) for r, f in _paired(runs, reference)]
    if not diffs:
        return "no common seed"
    spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    return f"paired difference {statistics.mean(diffs):+.1f}{spread} points"


def just_trained(matrix: Sequence[Sequence[float]]) -> list[float]:
    """Each task's accuracy just after training on it: the diagonal of the last ``T`` rows (rows before them,
    an initial evaluation, are ignored)."""
    rows = matrix[-len(matrix[0]):]
    return [rows[j][j] for j in range(len(rows))]


def learning_split(matrix: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Average accuracy split into what was learnt and what was lost since: the learning accuracy (mean of
    :func:`just_trained`) and ``(T-1)/T * BWT`` (BWT = mean over the earlier tasks of final minus just-trained
    accuracy); the two sum to the average accuracy of the last row."""
    diag = just_trained(matrix)
    n = len(diag)
    bwt = sum(matrix[-1][j] - diag[j] for j in range(n - 1)) / (n - 1) if n > 1 else 0.0
    return sum(diag) / n, (n - 1) / n * bwt


def learning_report(results: dict[str, list[dict[str, Any]]], label: Callable[[str], str],
                    task_names: Sequence[str]) -> str:
    """Why an accuracy differs from full fine-tuning's: per method, each task's accuracy just after training
    on it, the learning accuracy, and its paired accuracy difference to full fine-tuning on the same seeds split
    (:func:`learning_split`) into learning less (or more) and losing more (or less) afterwards."""
    full = {r["seed"]: r for r in results.get(FULL, [])}
    rows = []
    for name, runs in results.items():
        diag = list(zip(*(just_trained(r["matrix"]) for r in runs)))  # per task, over the runs
        split = [learning_split(r["matrix"]) for r in runs]
        pairs = [(s, learning_split(full[r["seed"]]["matrix"])) for s, r in zip(split, runs) if r["seed"] in full]
        diff = ["-", "-", "-"] if name == FULL or not pairs else [
            mean_std([sum(a) - sum(b) for a, b in pairs], 100),
            mean_std([a[0] - b[0] for a, b in pairs], 100),
            mean_std([a[1] - b[1] for a, b in pairs], 100)]
        rows.append([label(name), str(len(runs)), *(mean_std(d, 100) for d in diag),
                     mean_std([s[0] for s in split], 100), *diff])
    header = ["method", "seeds", *(f"{t} just trained (%)" for t in task_names), "learning acc (%)",
              "acc vs full FT (points)", "from learning", "from losing since"]
    return markdown_table(header, rows)


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a run's figures depend on (runs are aggregated only when these agree)."""
    keys = ("scenario", "replay_buffer", "train_per_task", "test_per_task", "max_length", "batch_size", "epochs",
            "subset_seed", "lr_full", "lr_adapter")
    return {k: getattr(args, k) for k in keys}


#: the code a run of this benchmark executes (its revision is saved with every run)
CODE_PATHS = ("cl_plugins", "callbacks", "datamodules", "examples/bench_peft_text.py", "examples/benchutils.py")


def save_run(path: str, name: str, shown: str, seed: int, args: argparse.Namespace, res: dict[str, Any],
             code: str | None = None) -> None:
    """Append one finished run to the JSON-lines file ``path`` (one object per line), with the revision of the
    code that ran it (``code``: taken when the process started; default: now)."""
    record = {"method": name, "label": shown, "seed": seed, "settings": run_settings(args),
              "threads": torch.get_num_threads(), "code": code or code_revision(CODE_PATHS), "results": res}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=lambda o: o.tolist() if hasattr(o, "tolist") else float(o)) + "\n")


def load_runs(paths: list[str], methods: list[str] | None, seeds: list[int] | None
              ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any], list[int], set[int]]:
    """``--aggregate``: the runs saved with ``--jsonl`` (filtered to ``methods`` and ``seeds`` when given),
    grouped by method in file order, with their common settings, seeds and thread counts. Runs of
    different settings, or a method measured twice on one seed, are refused rather than averaged."""
    results: dict[str, list[dict[str, Any]]] = {}
    settings: dict[str, Any] | None = None
    seen: set[tuple[str, int]] = set()
    found_seeds: list[int] = []
    threads: set[int] = set()
    for path in paths:
        lines = Path(path).read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if methods is not None and rec["method"] not in methods:
                continue
            if seeds is not None and rec["seed"] not in seeds:
                continue
            if settings is None:
                settings = rec["settings"]
            elif rec["settings"] != settings:
                raise SystemExit(f"{path}:{n}: {rec['method']} seed {rec['seed']} ran with {rec['settings']}, other "
                                 f"runs with {settings}; aggregate one setting (filter with --methods / --seeds)")
            if (rec["method"], rec["seed"]) in seen:
                raise SystemExit(f"{path}:{n}: {rec['method']} seed {rec['seed']} appears twice; keep one run per seed")
            seen.add((rec["method"], rec["seed"]))
            res = rec["results"]
            res["seed"] = rec["seed"]
            res["code"] = rec.get("code", "not recorded")
            if "l2m_key_match" in res:  # JSON object keys are strings
                res["l2m_key_match"] = {int(j): v for j, v in res["l2m_key_match"].items()}
            results.setdefault(rec["method"], []).append(res)
            threads.add(rec["threads"])
            if rec["seed"] not in found_seeds:
                found_seeds.append(rec["seed"])
    if settings is None:
        raise SystemExit(f"no run in {paths} matches --methods {methods} / --seeds {seeds}")
    return results, settings, found_seeds, threads


def pool(n: int, mean: float, std: float, values: Sequence[float]) -> tuple[int, float, float]:
    """Count, mean and sample std of ``n`` earlier values known only by their ``mean`` and sample ``std``,
    joined with ``values``: the statistics of all of them, as if every value were at hand."""
    total = n + len(values)
    if total == 0:
        raise ValueError("nothing to pool: no earlier value and no new one")
    mu = (n * mean + sum(values)) / total
    ss = max(n - 1, 0) * std**2 + n * (mean - mu) ** 2 + sum((x - mu) ** 2 for x in values)
    return total, mu, math.sqrt(ss / (total - 1)) if total > 1 else 0.0


def load_prior(path: str, settings: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """``--prior``: a summary of earlier seeds (per method: mean and std in percent of ``avg_acc``,
    ``avg_forgetting``, ``bwt``; for the targets the seeds holding them and the paired accuracy difference;
    for L2M the key agreement per task), checked to share the saved runs' settings and no seed with them."""
    prior = json.loads(Path(path).read_text())
    if prior.get("settings") != settings:
        raise SystemExit(f"{path}: its settings {prior.get('settings')} differ from the saved runs' {settings}; "
                         "pool only runs of one setting")
    shared = sorted(set(prior["seeds"]) & set(seeds))
    if shared:
        raise SystemExit(f"{path}: seeds {shared} are both in the summary and in the saved runs; keep one of them")
    return prior


def pooled_report(prior: dict[str, Any], results: dict[str, list[dict[str, Any]]],
                  label: Callable[[str], str], task_names: Sequence[str] | None = None) -> str:
    """The table and the targets over the summary's seeds and the saved runs' seeds together (:func:`pool`),
    under the rule of the per-seed table: means over the same seeds as full fine-tuning's."""
    n_prior = len(prior["seeds"])
    names = list(dict.fromkeys([*prior["methods"], *results]))

    def stat(name: str, key: str) -> tuple[int, float, float]:
        summary = prior["methods"].get(name)
        n, mean, std = (n_prior, *summary[key]) if summary else (0, 0.0, 0.0)
        return pool(n, mean, std, [100 * r[key] for r in results.get(name, [])])

    def fmt(s: tuple[int, float, float]) -> str:
        return f"{s[1]:.1f} ± {s[2]:.1f}"

    rows, targets, keys = [], [], []
    full_runs = results.get(FULL, [])
    full_seeds = {r["seed"] for r in full_runs}
    for name in names:
        runs = results.get(name, [])
        summary = prior["methods"].get(name, {})
        acc, forg = stat(name, "avg_acc"), stat(name, "avg_forgetting")
        rows.append([label(name), str(acc[0]), fmt(acc), fmt(forg), fmt(stat(name, "bwt"))])
        prior_keys = summary.get("l2m_key_match", [])
        run_keys = [r["l2m_key_match"] for r in runs if "l2m_key_match" in r]
        if prior_keys or run_keys:
            n_tasks = max([len(prior_keys), *(len(k) for k in run_keys)])
            per_task = [pool(*((n_prior, *prior_keys[j]) if prior_keys else (0, 0.0, 0.0)),
                             [100 * k[j] for k in run_keys]) for j in range(n_tasks)]
            keys.append([label(name), *(fmt(t) for t in per_task)])
        if name == FULL:
            continue
        seeds = {r["seed"] for r in runs}
        if not summary or FULL not in prior["methods"] or not seeds <= full_seeds:
            targets.append(f"- {label(name)}: no target: full fine-tuning did not run on the same seeds")
            continue
        # full fine-tuning over the same seeds: the summary's and those of this method's saved runs
        same = [f for f in full_runs if f["seed"] in seeds]
        full = prior["methods"][FULL]
        ref_acc = pool(n_prior, *full["avg_acc"], [100 * f["avg_acc"] for f in same])
        ref_forg = pool(n_prior, *full["avg_forgetting"], [100 * f["avg_forgetting"] for f in same])
        pairs = _paired(runs, full_runs)
        held_f = summary["held_forgetting"] + sum(halves_forgetting(r, f) for r, f in pairs)
        held_a = summary["held_accuracy"] + sum(matches_accuracy(r, f) for r, f in pairs)
        diff = pool(n_prior, *summary["acc_difference"], [100 * (r["avg_acc"] - f["avg_acc"]) for r, f in pairs])
        ok_f, ok_a = forg[1] <= 0.5 * ref_forg[1], acc[1] >= ref_acc[1]
        n = acc[0]
        targets.append(
            f"- {label(name)}: forgetting {forg[1]:.1f}% vs half of full FT's {0.5 * ref_forg[1]:.1f}%: "
            f"{'met' if ok_f else 'NOT met'} ({held_f}/{n} seeds); accuracy {acc[1]:.1f}% vs full FT's "
            f"{ref_acc[1]:.1f}%: {'met' if ok_a else 'NOT met'} ({held_a}/{n} seeds, paired difference "
            f"{diff[1]:+.1f} ± {diff[2]:.1f} points)")
    text = markdown_table(["method", "seeds", "avg acc (%)", "forgetting (%)", "BWT (%)"], rows)
    if keys:
        text += "\n\nL2M train/test key agreement (%), pooled the same way:\n\n"
        names = task_names or [f"task {j}" for j in range(len(keys[0]) - 1)]
        text += markdown_table(["method", *(f"{t} (%)" for t in names)], keys)
    return text + "\n\nTargets, pooled:\n" + "\n".join(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (with --aggregate: all saved)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"subset of {list(METHODS)} (default: all), or the variants {list(VARIANTS)}")
    parser.add_argument("--scenario", choices=("task", "class"), default="task")
    parser.add_argument("--replay-buffer", type=int, default=0,
                        help="add ExperienceReplay with this many samples to every method (0: none)")
    parser.add_argument("--train-per-task", type=int, default=DEFAULT_TRAIN_PER_TASK)
    parser.add_argument("--test-per-task", type=int, default=DEFAULT_TEST_PER_TASK)
    parser.add_argument("--eval-batch-size", type=int, default=256, help="evaluation batch (inference only)")
    parser.add_argument("--evaluate-initial", action="store_true",
                        help="also evaluate the untrained model (forward transfer; one evaluation pass more)")
    parser.add_argument("--full-matrix", action="store_true",
                        help="evaluate every test experience in full after every experience (default: the "
                             "experiences not trained yet on 32 samples, see SeenTestStream)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per experience")
    parser.add_argument("--lr-full", type=float, default=5e-5, help="AdamW lr of full fine-tuning")
    parser.add_argument("--lr-adapter", type=float, default=1e-3,
                        help="AdamW lr at alpha/r = 2 (other scales: same lr * scale)")
    parser.add_argument("--lr", nargs="*", default=[], help="per-method overrides, METHOD=LR")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the per-task data subsets")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps per experience left out of the timing")
    parser.add_argument("--timing-rounds", type=int, default=4,
                        help="rounds of the interleaved step timing (0: skip it)")
    parser.add_argument("--timing-steps", type=int, default=5, help="timed steps per method and round")
    parser.add_argument("--no-probe", action="store_true", help="skip the knowledge probe")
    parser.add_argument("--l2m-keys-only", action="store_true",
                        help="only L2M's train/test key agreement, from its keys trained on the frozen queries "
                             "(seconds per seed; see key_agreement), for key_update 'mean' and 'gradient'")
    parser.add_argument("--root", type=str, default=None, help="text benchmark archive or folder")
    parser.add_argument("--markdown", type=str, default=None, help="write the tables to this file")
    parser.add_argument("--jsonl", type=str, default=None,
                        help="append each finished run (method, seed, settings, results) to this JSON-lines file")
    parser.add_argument("--aggregate", nargs="+", default=None, metavar="JSONL",
                        help="train nothing: build the tables from runs saved with --jsonl (several invocations, "
                             "e.g. one seed per core); --methods / --seeds filter them")
    parser.add_argument("--prior", type=str, default=None, metavar="JSON",
                        help="with --aggregate: a summary of earlier seeds of the same setting (mean and std per "
                             "method, see load_prior) pooled with the saved runs into one more table")
    args = parser.parse_args()
    aggregated = None
    if args.aggregate:
        aggregated = load_runs(args.aggregate, args.methods, args.seeds)
        for key, value in aggregated[1].items():  # the saved runs' settings, for the labels and the settings line
            setattr(args, key, value)
        args.seeds, args.no_probe, args.timing_rounds = aggregated[2], True, 0
    elif args.seeds is None:
        args.seeds = [0]
    if args.prior and not aggregated:
        parser.error("--prior pools a summary with saved runs: use it with --aggregate")
    prior = load_prior(args.prior, aggregated[1], aggregated[2]) if args.prior else None
    chosen = args.methods or list(METHODS)
    unknown = [m for m in chosen if m not in METHODS and m not in VARIANTS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {[*METHODS, *VARIANTS]}")
    if args.replay_buffer < 0:
        parser.error(f"--replay-buffer must be >= 0, got {args.replay_buffer}")
    overrides = parse_lr_overrides(args.lr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model_path = default_tokenizer_path()  # the all-MiniLM-L6-v2 folder (model and tokenizer)
    t0 = time.perf_counter()
    # the code this process runs, whatever changes while it does (saved with each run)
    started_at = code_revision(CODE_PATHS) if args.jsonl else None
    if args.l2m_keys_only:
        keys_only(args, model_path)
        return

    def lr_of(name: str) -> float:
        if name in overrides:
            return overrides[name]
        base = base_method(name)
        if base in overrides:
            return overrides[base]
        return args.lr_full if base == FULL else args.lr_adapter * 2.0 / ADAPTER_SCALE[base]

    def label(name: str) -> str:
        return f"{name} + ER" if args.replay_buffer else name

    def with_replay(callbacks: list[pl.Callback], seed: int) -> list[pl.Callback]:
        if not args.replay_buffer:
            return callbacks
        return [*callbacks, ExperienceReplay(buffer_size=args.replay_buffer, seed=seed)]

    def make_stream(seed: int) -> TextCLStream:
        kind = TextCLStream if args.full_matrix or args.evaluate_initial else SeenTestStream
        return kind(root=args.root, max_length=args.max_length, max_train_per_task=args.train_per_task,
                    max_test_per_task=args.test_per_task, scenario=args.scenario,
                    subset_seed=args.subset_seed, epochs_per_experience=args.epochs,
                    batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, seed=seed)

    stream0 = make_stream(args.seeds[0])
    tok, pad = stream0.tokenizer(), stream0.pad_token_id
    num_classes = len(stream0.label_names)
    pairs_a, pairs_b = probe.encode_pairs(tok, args.max_length, pad)
    reference: list[float] | None = None
    if not args.no_probe:
        pretrained = ContinualClassifier(f"hf:{model_path}", num_classes=num_classes)
        reference = probe.pair_similarities(pretrained, pairs_a, pairs_b, pad)
        del pretrained

    results: dict[str, list[dict[str, Any]]] = {} if aggregated is None else aggregated[0]
    # seeds outermost: methods interleave, so machine load drifts hit all alike
    for seed in args.seeds if aggregated is None else []:
        for name in chosen:
            pl.seed_everything(seed, verbose=False)
            dm = make_stream(seed)
            model = ContinualClassifier(f"hf:{model_path}", num_classes=num_classes, optimizer="adamw",
                                        lr=lr_of(name))
            timer = StepTimer(warmup=args.warmup_steps)
            callbacks = with_replay(method_callbacks(name), seed)
            cpu0 = time.process_time()
            res = run_stream(model, dm, [timer, *callbacks, Progress(f"{label(name)} seed {seed}"), timer.end],
                             evaluate_initial=args.evaluate_initial)
            res["cpu_s"] = time.process_time() - cpu0
            res["seed"] = seed
            if not timer.steps:
                raise SystemExit(f"no step was timed: every experience has at most --warmup-steps={args.warmup_steps} "
                                 "steps; train on more samples per task or lower --warmup-steps")
            res.update(trainable=timer.trainable, step_s=statistics.median(timer.steps),
                       forward_s=statistics.median(timer.forward), backward_s=statistics.median(timer.backward),
                       steps_timed=len(timer.steps), lr=lr_of(name))
            if reference is not None:
                sims: list[list[float]] = []

                def run_probe(model: ContinualClassifier = model, out: list[list[float]] = sims) -> None:
                    out.append(probe.pair_similarities(model, pairs_a, pairs_b, pad))

                selected = probe.l2m_selected_entries(model, run_probe)
                res.update(probe.compare(reference, sims[0]))
                res["probe_entries"] = sorted(set(selected))
            l2m = next((cb for cb in callbacks if isinstance(cb, L2M)), None)
            if l2m is not None:
                res["l2m_keys"] = {e: [i for i, c in enumerate(h) if c] for e, h in l2m.key_histograms.items()}
                # share of each test experience's samples whose key (after the whole stream) is one that its
                # training experience selected: how often test-time selection finds the trained modulators
                res["l2m_key_match"] = {j: round(m, 3) for j, m in l2m.eval_key_match("validate").items()}
            results.setdefault(name, []).append(res)
            if args.jsonl:
                save_run(args.jsonl, name, label(name), seed, args, res, code=started_at)
            extra = (f"  probe rho {res['spearman_vs_pretrained']:.3f} |dsim| {res['mean_abs_change']:.3f}"
                     if reference is not None else "")
            print(f"{label(name):17s} seed {seed} lr {lr_of(name):g}: acc {res['avg_acc']:.4f}  forgetting "
                  f"{res['avg_forgetting']:.4f}  bwt {res['bwt']:.4f}  step {1e3 * res['step_s']:.0f} ms "
                  f"(fwd {1e3 * res['forward_s']:.0f}, bwd {1e3 * res['backward_s']:.0f})  "
                  f"wall {res['wall_s']:.1f}s  cpu {res['cpu_s']:.0f}s{extra}", flush=True)
            print("  accuracy matrix (row: after experience i): "
                  + "; ".join(" ".join(f"{100 * a:.1f}" for a in row) for row in res["matrix"]), flush=True)
            if "l2m_keys" in res:
                print(f"  L2M keys selected in training per experience: {res['l2m_keys']}; "
                      f"by the probe sentences: {res.get('probe_entries')}; share of each test experience "
                      f"selecting a key its training experience used: {res['l2m_key_match']}", flush=True)

    interleaved: dict[str, list[float]] = {}
    if args.timing_rounds > 0:
        def timing_model(name: str) -> ContinualClassifier:
            pl.seed_everything(args.seeds[0], verbose=False)
            return ContinualClassifier(f"hf:{model_path}", num_classes=num_classes, optimizer="adamw", lr=lr_of(name))

        def timing_stream() -> TextCLStream:
            return TextCLStream(root=args.root, tasks=["agnews"], max_length=args.max_length,
                                max_train_per_task=args.batch_size * (args.warmup_steps + args.timing_steps),
                                max_test_per_task=args.batch_size, scenario=args.scenario, batch_size=args.batch_size,
                                seed=args.seeds[0])

        interleaved = interleaved_step_times(chosen, timing_model, timing_stream, args.timing_rounds,
                                             args.warmup_steps)
        print("interleaved step times (ms, median): " + ", ".join(
            f"{n} {1e3 * statistics.median(v):.0f}" for n, v in interleaved.items()), flush=True)

    def mean_of(name: str, key: str) -> float | None:
        runs = results.get(name)
        return statistics.mean(r[key] for r in runs) if runs else None

    def inter(name: str) -> float | None:
        return statistics.median(interleaved[name]) if interleaved.get(name) else None

    full_step, lora_step = mean_of(FULL, "step_s"), mean_of(BASELINE, "step_s")
    full_int, lora_int = inter(FULL), inter(BASELINE)
    full_forg, full_acc = mean_of(FULL, "avg_forgetting"), mean_of(FULL, "avg_acc")
    header = ["method", "lr", "avg acc (%)", "forgetting (%)", "BWT (%)", "trainable params", "step (ms)",
              "step vs full FT", "step vs LoRA", "interleaved step (ms)", "interleaved vs full FT",
              "interleaved vs LoRA", "wall (s)", "CPU (s)"]
    rows, targets = [], []
    for name, runs in results.items():
        step = statistics.mean(r["step_s"] for r in runs)
        forg = statistics.mean(r["avg_forgetting"] for r in runs)
        istep = inter(name)
        rows.append([
            label(name), f"{runs[0]['lr']:g}",
            mean_std([r["avg_acc"] for r in runs], 100),
            mean_std([r["avg_forgetting"] for r in runs], 100),
            mean_std([r["bwt"] for r in runs], 100),
            fmt_params(statistics.mean(r["trainable"] for r in runs)),
            mean_std([r["step_s"] for r in runs], 1e3, 0),
            f"{step / full_step:.2f}x" if full_step else "-",
            f"{step / lora_step:.2f}x" if lora_step else "-",
            f"{1e3 * istep:.0f}" if istep else "-",
            f"{istep / full_int:.2f}x" if istep and full_int else "-",
            f"{istep / lora_int:.2f}x" if istep and lora_int else "-",
            f"{statistics.mean(r['wall_s'] for r in runs):.0f}",
            f"{statistics.mean(r['cpu_s'] for r in runs):.0f}",
        ])
        if name != FULL and full_forg is not None and full_acc is not None:
            acc = statistics.mean(r["avg_acc"] for r in runs)
            # full fine-tuning over the seeds this method ran (a method measured on fewer seeds is compared
            # with the same seeds of the reference)
            same = [f for _, f in _paired(runs, results[FULL])] or results[FULL]
            ref_forg = statistics.mean(f["avg_forgetting"] for f in same)
            ref_acc = statistics.mean(f["avg_acc"] for f in same)
            ok_f, ok_a = forg <= 0.5 * ref_forg, acc >= ref_acc
            held_f = seeds_holding(runs, results[FULL], halves_forgetting)
            held_a = seeds_holding(runs, results[FULL], matches_accuracy)
            diff = paired_difference(runs, results[FULL])
            line = (f"- {label(name)}: forgetting {100 * forg:.1f}% vs half of full FT's {50 * ref_forg:.1f}%: "
                    f"{'met' if ok_f else 'NOT met'} ({held_f}); accuracy {100 * acc:.1f}% vs full FT's "
                    f"{100 * ref_acc:.1f}%: {'met' if ok_a else 'NOT met'} ({held_a}, {diff})")
            if lora_step and base_method(name) != FULL:  # the step target is the adapters'
                ratio = (istep / lora_int) if istep and lora_int else step / lora_step
                which = "interleaved step" if istep and lora_int else "step"
                line += f"; {which} {ratio:.2f}x LoRA (<= 1.3x): {'met' if ratio <= 1.3 else 'NOT met'}"
            targets.append(line)
    text = markdown_table(header, rows)
    l2m_rows = []
    for name, runs in results.items():
        matches = [r["l2m_key_match"] for r in runs if "l2m_key_match" in r]
        if matches:
            tasks = sorted({j for m in matches for j in m})
            l2m_rows.append([label(name)] + [mean_std([m.get(j) for m in matches], 100) for j in tasks])
    if l2m_rows:
        text += ("\n\nL2M train/test key agreement (% of each test experience's samples selecting a key its "
                 "training experience selected):\n\n")
        text += markdown_table(["method", *(f"{t} (%)" for t in stream0.tasks)], l2m_rows)
    if reference is not None:
        probe_header = ["method", "Spearman vs pretrained", "mean |Δ similarity|", "Spearman vs hand grades",
                        "mean similarity"]
        probe_rows = [["pretrained MiniLM", "1.000", "0.000",
                       f"{probe.spearman([p[2] for p in probe.PAIRS], reference):.3f}",
                       f"{sum(reference) / len(reference):.3f}"]]
        for name, runs in results.items():
            probe_rows.append([label(name), mean_std([r["spearman_vs_pretrained"] for r in runs], 1, 3),
                               mean_std([r["mean_abs_change"] for r in runs], 1, 3),
                               mean_std([r["spearman_vs_grades"] for r in runs], 1, 3),
                               mean_std([r["mean_similarity"] for r in runs], 1, 3)])
        text += "\n\nKnowledge probe (30 sentence pairs, mean-pooled encoder cosine):\n\n"
        text += markdown_table(probe_header, probe_rows)
    if targets:
        text += "\n\nTargets:\n" + "\n".join(targets)
    if all("matrix" in r for runs in results.values() for r in runs):
        text += ("\n\nWhere the accuracy goes (accuracy of each task just after training on it; the paired "
                 "difference to full fine-tuning split into learning and losing since, see learning_split):\n\n"
                 + learning_report(results, label, stream0.tasks))
    if prior is not None:
        text += (f"\n\nPooled with {args.prior} (seeds {prior['seeds']}: {prior['source']}), "
                 f"{len(prior['seeds']) + len(args.seeds)} seeds:\n\n"
                 + pooled_report(prior, results, label, stream0.tasks))
    total = time.perf_counter() - t0
    n_threads = torch.get_num_threads() if aggregated is None else "/".join(map(str, sorted(aggregated[3])))
    replay = f", ExperienceReplay({args.replay_buffer}) on every method" if args.replay_buffer else ""
    settings = (f"{args.scenario}-IL{replay}, {args.train_per_task} train / {args.test_per_task} test per task, "
                f"max_length {args.max_length}, batch {args.batch_size}, {args.epochs} epoch(s) per experience, "
                f"AdamW, subset seed {args.subset_seed}, seeds {args.seeds}, threads {n_threads}; "
                f"step = median over the steps after the first {args.warmup_steps} of each experience; interleaved: "
                f"{args.timing_rounds} rounds x {args.timing_steps} steps per method on AG News, round-robin; "
                + (f"total wall time {total:.0f} s; " if aggregated is None else
                   f"aggregated from {', '.join(args.aggregate)} (code "
                   f"{', '.join(sorted({r['code'] for rs in results.values() for r in rs}))}); ")
                + f"CPU = process CPU time of the run (the wall time it takes on {n_threads} otherwise idle "
                f"core(s) is about CPU / {n_threads})")
    print(text)
    print(settings)
    if args.markdown:
        write_markdown(args.markdown, f"PEFT methods on AG News -> Yelp -> Amazon -> DBpedia, MiniLM "
                       f"({args.scenario}-IL, {len(args.seeds)} seed(s))", f"{text}\n\n{settings}")


if __name__ == "__main__":
    main()
