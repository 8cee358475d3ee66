"""CPU DDP with 1 and 2 processes on the embedded default stream: accuracy-matrix agreement and wall time.

Each row runs ``train.py fit --config configs/default.yaml`` (Split-MNIST 5 x 2, small CNN, 1 epoch
per experience) in a subprocess, as a user would. The global batch is the same in every row (32:
1 process x 32 or 2 processes x 16); one process and DDP draw the same permutation of each epoch
(``DistributedSampler`` deals it out round-robin), so both train on the same global batches.

Naive fine-tuning is then the same computation on 1 and 2 processes, up to the order of float
additions in the gradient all-reduce, for as long as the batches are the same (``tests/test_stream.py``
checks that the weights agree to 1e-6 after 8 steps). At the end of an experience whose size is not a
multiple of the global batch they are not: ``DistributedSampler`` pads the last, partial batch by
repeating samples, and each rank averages its own half. Over a whole stream (about 1,900 steps at
lr 0.05) such differences grow, so the final matrices differ the way two nearby runs do.

Replay keeps one reservoir per rank (each rank replays from what it saw): 2 x 250 holds the memory
of 1 x 500 but samples differently, so its matrix is expected to differ within seed-to-seed spread;
2 x 500 is what the same config gives on 2 processes unchanged (twice the memory).

    python examples/bench_ddp.py --markdown runs/ddp.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cl_plugins.metrics import format_matrix  # noqa: E402
from examples.benchutils import markdown_table, write_markdown  # noqa: E402

ROWS = [  # name, processes, batch per process, replay buffer per rank (None: naive)
    ("naive", 1, 32, None),
    ("naive", 2, 16, None),
    ("replay", 1, 32, 500),
    ("replay", 2, 16, 250),
    ("replay", 2, 16, 500),
]


def run(processes: int, batch: int, buffer: int | None, seed: int, workdir: Path) -> dict[str, Any]:
    """One ``train.py fit`` of the default config; returns its metrics.json and the command's wall time."""
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    out = workdir / f"p{processes}_b{batch}_r{buffer}"
    cfg["seed_everything"] = seed
    cfg["data"]["init_args"].update(batch_size=batch, seed=seed)
    cfg["trainer"].update(devices=processes, strategy="ddp" if processes > 1 else "auto",
                          default_root_dir=str(out), enable_progress_bar=False, logger=False,
                          enable_checkpointing=False)
    callbacks = [{"class_path": "callbacks.metrics.ContinualMetrics", "init_args": {"output_dir": str(out)}}]
    if buffer is not None:
        callbacks.insert(0, {"class_path": "callbacks.ExperienceReplay", "init_args": {"buffer_size": buffer}})
    cfg["trainer"]["callbacks"] = callbacks
    config = workdir / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({processes} process(es), buffer {buffer}):\n{proc.stderr[-3000:]}")
    return {**json.loads((out / "metrics.json").read_text()), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="cl_ddp_") as tmp:
        for name, processes, batch, buffer in ROWS:
            res = run(processes, batch, buffer, args.seed, Path(tmp))
            results[(name, processes, buffer)] = res
            print(f"{name} {processes} x {batch}, buffer {buffer}: avg acc {res['final']['avg_acc']:.4f}  "
                  f"wall {res['wall_s']:.1f}s\n{format_matrix(res['matrix'])}", flush=True)

    rows = []
    for name, processes, batch, buffer in ROWS:
        res = results[(name, processes, buffer)]
        ref = results[(name, 1, 500 if buffer else None)]
        diff = max(abs(a - b) for ra, rb in zip(res["matrix"], ref["matrix"]) for a, b in zip(ra, rb))
        rows.append([name, f"{processes} x {batch}", "-" if buffer is None else f"{buffer} per rank",
                     f"{100 * res['final']['avg_acc']:.2f}", f"{100 * res['final']['avg_forgetting']:.2f}",
                     "-" if processes == 1 else f"{100 * diff:.2f}",
                     f"{res['wall_s']:.1f}", f"{res['wall_s'] / ref['wall_s']:.2f}x"])
    header = ["method", "processes x batch", "buffer", "avg acc (%)", "forgetting (%)",
              "max |ΔR| vs 1 process (points)", "wall (s)", "wall vs 1 process"]
    table = markdown_table(header, rows)
    print(table)
    if args.markdown:
        write_markdown(args.markdown, f"CPU DDP, 1 vs 2 processes (seed {args.seed})", table)


if __name__ == "__main__":
    main()
