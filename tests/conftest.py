"""Shared fixtures: offline Hugging Face, quiet logs, the shared data folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one intra-op thread unless OMP_NUM_THREADS says otherwise (the suite is also run with 2, which changes the
# order of float reductions: tolerances must hold either way)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CL_DATA_ROOT", ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (or $CL_DATA_ROOT); skips the test where it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (set CL_DATA_ROOT)")
    return SHARED_DATA


def quiet_trainer_kwargs(**overrides):
    """Trainer arguments for fast, silent CPU tests."""
    kw = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=True,
    )
    kw.update(overrides)
    return kw


@pytest.fixture(autouse=True)
def _cwd_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in a fresh working directory: anything a test leaves in the current directory (a run
    folder of a trainer without ``default_root_dir``, ``metrics.json`` of a callback without ``output_dir``)
    lands there, not in the repository."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
