"""Cost of the replay buffer per training batch: ``add()`` of the batch plus one ``sample()`` of a replay batch.

Stream: ``--samples`` random MNIST-shaped inputs (1 x 28 x 28 float32, labels 0-9) offered in batches of
each ``--batch-sizes`` value to a buffer of ``--capacity`` samples; every batch also draws a replay batch of
the same size (what ``ExperienceReplay`` does per step). Rows:

- ``loop (before)``: the insertion as it was before the vectorized one (a Python loop over the batch
  with one ``torch.randint`` per sample once the buffer is full), kept here as the baseline;
- ``reservoir``: :class:`cl_plugins.buffers.ReservoirBuffer` (one draw per batch, one write per field);
- ``class_balanced``: :class:`cl_plugins.buffers.ClassBalancedBuffer` (per-sample bookkeeping in Python).

The variants run round-robin, ``--rounds`` times each (the machine is shared: the table gives the
median over rounds of the mean microseconds per batch).

    OMP_NUM_THREADS=1 python examples/bench_reservoir.py                  # 60,000 samples, batches 10 and 32
    OMP_NUM_THREADS=1 python examples/bench_reservoir.py --samples 6000  # a quick run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_plugins.buffers import ClassBalancedBuffer, ReservoirBuffer  # noqa: E402


class LoopReservoir(ReservoirBuffer):
    """The per-sample insertion of the previous version (the baseline of this benchmark)."""

    def add(self, x: Tensor, y: Tensor, task_labels: Tensor, logits: Tensor | None = None,
            experience: int | None = None) -> int:
        fields = self._fields(x, y, task_labels, logits, experience)
        if not self.data:
            self._allocate(fields)
        stored = 0
        for i in range(fields["y"].shape[0]):
            self.num_seen += 1
            if self.num_seen <= self.capacity:
                slot = self.num_seen - 1
            else:
                slot = int(torch.randint(0, self.num_seen, (1,), generator=self.generator))
                if slot >= self.capacity:
                    continue
            for key, value in fields.items():
                self.data[key][slot] = value[i]
            stored += 1
        return stored


VARIANTS = {"loop (before)": LoopReservoir, "reservoir": ReservoirBuffer, "class_balanced": ClassBalancedBuffer}


def time_stream(cls: type[ReservoirBuffer], x: Tensor, y: Tensor, t: Tensor, batch: int, capacity: int) -> float:
    """Mean microseconds of ``add`` + ``sample`` per batch over the whole stream."""
    buf = cls(capacity, seed=0)
    n = y.shape[0] - y.shape[0] % batch
    start = time.perf_counter()
    for i in range(0, n, batch):
        buf.add(x[i:i + batch], y[i:i + batch], t[i:i + batch])
        buf.sample(batch)
    return (time.perf_counter() - start) / (n // batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 32])
    parser.add_argument("--capacity", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    t = torch.zeros(args.samples, dtype=torch.long)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for batch in args.batch_sizes:
            for name, cls in VARIANTS.items():
                times.setdefault((name, batch), []).append(time_stream(cls, x, y, t, batch, args.capacity))

    print(f"add()+sample() per batch, microseconds (median of {args.rounds} rounds; {args.samples} samples of "
          f"1x28x28, capacity {args.capacity}, torch {torch.__version__}, {torch.get_num_threads()} thread(s))")
    print("| variant | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |")
    print("|---|" + "---|" * len(args.batch_sizes))
    for name in VARIANTS:
        cells = [f"{statistics.median(times[(name, b)]):.1f}" for b in args.batch_sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    base = "loop (before)"
    for b in args.batch_sizes:
        speedup = statistics.median(times[(base, b)]) / statistics.median(times[("reservoir", b)])
        print(f"batch {b}: reservoir is {speedup:.1f}x faster than the loop")


if __name__ == "__main__":
    main()
