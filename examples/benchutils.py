"""Shared helpers of the benchmark scripts: run one stream, time it, print / write a table."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from callbacks.metrics import ContinualMetrics


def run_stream(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    callbacks: Sequence[pl.Callback] = (),
    output_dir: str | None = None,
    evaluate_initial: bool = True,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Trains ``model`` on the whole stream with ``callbacks``; returns the metrics summary, the
    accuracy matrix and the wall time of ``fit`` in seconds. ``evaluate_initial=False`` skips the
    evaluation of the untrained model (no forward transfer, one evaluation pass less)."""
    # without an output folder the reports go to a throwaway folder, not the working directory
    out = output_dir or tempfile.mkdtemp(prefix="cl_bench_")
    metrics = ContinualMetrics(output_dir=out, plot=output_dir is not None, evaluate_initial=evaluate_initial)
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              default_root_dir=out)
    kw.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[*callbacks, metrics], **kw)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    task_il = metrics.results()["task_il"]
    return {**metrics.summary(), "wall_s": wall, "matrix": metrics.matrix,
            "task_il_avg_acc": None if task_il is None else task_il["final"]["avg_acc"]}


def mean_std(values: Sequence[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of the non-missing values (``-`` when none)."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summarize(
    results: dict[str, list[dict[str, Any]]], reference: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Table of mean ± std over seeds per method: accuracy, forgetting, BWT (in %), wall time and
    its ratio to ``reference``'s mean wall time."""
    ref = statistics.mean(r["wall_s"] for r in results[reference]) if reference in results else None
    header = ["method", "avg acc (%)", "forgetting (%)", "BWT (%)", "wall (s)", "time vs " + (reference or "-")]
    rows = []
    for name, runs in results.items():
        wall = statistics.mean(r["wall_s"] for r in runs)
        rows.append([
            name,
            mean_std([r["avg_acc"] for r in runs], 100),
            mean_std([r["avg_forgetting"] for r in runs], 100),
            mean_std([r["bwt"] for r in runs], 100),
            f"{wall:.1f}",
            f"{wall / ref:.2f}x" if ref else "-",
        ])
    return header, rows


def write_markdown(path: str | Path, title: str, text: str) -> None:
    """Writes ``text`` under a heading to ``path`` (a file the caller pastes into BENCHMARKS.md)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"### {title}\n\n{text}\n")


def code_revision(paths: Sequence[str], root: Path | None = None) -> str:
    """``git describe``-style revision of the code a benchmark runs: ``<commit>``, or ``<commit>+changes`` when
    any of ``paths`` (files or folders, relative to the repository root) differs from that commit; ``unknown``
    outside a git checkout. Saved beside every result, so a table says which code measured it."""
    import subprocess

    root = root or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")
