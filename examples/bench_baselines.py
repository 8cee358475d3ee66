"""The references on the embedded default stream: naive, experience replay and joint training.

Split-MNIST (5 x 2 classes, class-IL), the small CNN (width 16) of ``configs/default.yaml``, 1 epoch per
experience, batch 32, SGD lr 0.05; replay with a 500-sample reservoir. Prints a table (mean ± std
over seeds) and, with ``--markdown PATH``, writes it for BENCHMARKS.md.

    python examples/bench_baselines.py --seeds 0 1 2 --markdown runs/baselines.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import ExperienceReplay, JointTraining  # noqa: E402
from cl_plugins import ContinualClassifier  # noqa: E402
from datamodules import SplitMNIST  # noqa: E402
from datamodules.mnist import load_mnist_tensors  # noqa: E402
from examples.benchutils import markdown_table, run_stream, summarize, write_markdown  # noqa: E402

METHODS = {
    "naive": lambda: [],
    "replay (500)": lambda: [ExperienceReplay(buffer_size=500)],
    "joint (upper bound)": lambda: [JointTraining()],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per experience")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--markdown", type=str, default=None)
    parser.add_argument("--output-dir", type=str, default=None, help="write heatmaps and metrics.json here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results: dict[str, list[dict]] = {}
    load_mnist_tensors(getattr(args, "root", None))  # decode MNIST once, outside the timed fits
    for name in args.methods:
        for seed in args.seeds:
            pl.seed_everything(seed, verbose=False)
            dm = SplitMNIST(n_experiences=5, epochs_per_experience=args.epochs, batch_size=args.batch_size, seed=seed)
            model = ContinualClassifier("small_cnn", num_classes=10, in_channels=1, lr=args.lr,
                                        backbone_kwargs={"width": 16})
            out = None
            if args.output_dir:
                out = str(Path(args.output_dir) / f"{name.split()[0]}_seed{seed}")
            res = run_stream(model, dm, METHODS[name](), output_dir=out)
            results.setdefault(name, []).append(res)
            print(f"{name:22s} seed {seed}: avg acc {res['avg_acc']:.4f}  wall {res['wall_s']:.1f}s", flush=True)
    header, rows = summarize(results, reference="naive")
    table = markdown_table(header, rows)
    print(table)
    if args.markdown:
        write_markdown(args.markdown, f"Split-MNIST baselines ({len(args.seeds)} seed(s))", table)


if __name__ == "__main__":
    main()
