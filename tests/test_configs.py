"""Every shipped config (``configs/**/*.yaml``) through ``train.py fit`` on a few batches.

The configs run in this process (``train.main``), one after another: each trains every experience
of its stream on its first batches, evaluates every test experience after each one and writes
``metrics.json``. To keep that within seconds per config, the test shrinks what does not change
the config's structure: one epoch per experience, 2 training batches and 1 validation batch per
loader, small class-balanced subsets where the stream offers them, no loader workers, and a
narrower ResNet-18. The model, the callbacks and their arguments are the config's own. A config
skips where the shared data file its stream reads is missing, or where it names a callback of a
branch not merged yet (``PENDING_CALLBACKS``); anything else that fails is a failure.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import train
from datamodules import DataNotFoundError, SplitCIFAR10, TextCLStream
from datamodules.cifar import resolve_cifar10_source
from datamodules.text import resolve_text_source

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("**/*.yaml"))

#: callbacks that a branch not yet merged adds: a config naming one skips (with this reason) where
#: the class is missing, and runs as soon as it exists. Any other missing class is a failure.
PENDING_CALLBACKS = {
    "callbacks.OnlineEWC": "the online EWC callback (branch regbase)",
    "callbacks.SynapticIntelligence": "the SI callback (branch regbase)",
    "callbacks.LwF": "the LwF callback (branch regbase)",
}

#: streams that read a file of the shared data folder (``$CL_DATA_ROOT`` or ``../shared/data``): a
#: config skips where that file is missing
SHARED_DATA_STREAMS = {SplitCIFAR10: resolve_cifar10_source, TextCLStream: resolve_text_source}

#: datamodule arguments set for speed (and no download attempt), where the stream takes them
SHRINK_DATA = {
    "download": False,
    "epochs_per_experience": 1,
    "num_workers": 0,
    "train_samples_per_class": 16,
    "test_samples_per_class": 8,
    "max_train_per_task": 32,
    "max_test_per_task": 8,
    "max_length": 12,
}
#: backbone arguments set for speed (merged into the config's ``backbone_kwargs``)
SHRINK_BACKBONE = {"resnet18": {"nf": 8}}

#: machine-specific path prefixes that must not appear anywhere in a config, comments included
MACHINE_PATH = re.compile(r"(?<![\w.:/])(?:/(?:work|home|root|tmp|usr|opt|mnt|data|Users|var)/|~/|[A-Za-z]:[\\/])")


def _load(config: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / config).read_text())


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _callback_paths(cfg: dict[str, Any]) -> list[str]:
    callbacks = (cfg.get("trainer") or {}).get("callbacks") or []
    return [c["class_path"] for c in callbacks if isinstance(c, dict) and "class_path" in c]


def _skip_if_pending(cfg: dict[str, Any]) -> None:
    for path in _callback_paths(cfg):
        if path not in PENDING_CALLBACKS:
            continue
        try:
            _import(path)
        except (ImportError, AttributeError):
            pytest.skip(f"{path} is not in this checkout: the config waits for {PENDING_CALLBACKS[path]}")


def _skip_without_shared_data(cfg: dict[str, Any]) -> None:
    data = cfg["data"]
    resolve = SHARED_DATA_STREAMS.get(_import(data["class_path"]))
    if resolve is None:
        return
    try:
        resolve((data.get("init_args") or {}).get("root"))
    except DataNotFoundError as err:
        pytest.skip(f"the stream's data is not on this machine: {err}")


def _init_params(cls: type) -> set[str]:
    """Argument names of ``cls.__init__`` and, through ``**kwargs``, of its bases' (as the CLI reads them)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _shrink_args(cfg: dict[str, Any]) -> list[str]:
    data = cfg["data"]
    params = _init_params(_import(data["class_path"]))
    args = [f"--data.init_args.{k}={v}" for k, v in SHRINK_DATA.items() if k in params]
    model = (cfg.get("model") or {}).get("init_args") or {}
    extra = SHRINK_BACKBONE.get(model.get("backbone", ""))
    if extra:
        kwargs = {**(model.get("backbone_kwargs") or {}), **extra}
        args.append(f"--model.init_args.backbone_kwargs={json.dumps(kwargs)}")
    return args


@pytest.fixture
def restore_global_state() -> Iterator[None]:
    """Configs set process-wide state (``deterministic: true`` turns on torch's deterministic
    algorithms; seeding and the CLI set environment variables): put it back after each run."""
    env = dict(os.environ)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(env)


def _expand_braces(pattern: str) -> list[str]:
    """``a/{x,y}_{1,2}.yaml`` -> the four names, as a shell expands them."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_readme_lists_every_config():
    """The README's table of configs names each shipped config (brace patterns expanded), and only those."""
    text = (ROOT / "README.md").read_text()
    listed = {name for m in re.finditer(r"`(configs/[^`]+\.yaml)`", text) for name in _expand_braces(m.group(1))}
    assert "configs/default.yaml" in CONFIGS and "configs/digits_smoke.yaml" in CONFIGS
    assert set(CONFIGS) - listed == set(), "configs missing from README.md's table"
    assert listed - set(CONFIGS) == set(), "README.md names configs that do not exist"


@pytest.mark.parametrize("config", CONFIGS)
def test_config_trains_and_evaluates_every_experience(config: str, tmp_path: Path, restore_global_state) -> None:
    """``train.py fit --config <config>`` (shrunk, see the module docstring) trains each experience,
    fills one accuracy-matrix row per experience and writes ``metrics.json``."""
    cfg = _load(config)
    _skip_if_pending(cfg)
    _skip_without_shared_data(cfg)
    out = tmp_path / "run"
    args = ["fit", "--config", str(ROOT / config), f"--trainer.default_root_dir={out}", "--trainer.logger=false",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_epochs=null",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *_shrink_args(cfg)]
    cli = train.main(args)

    trainer, dm = cli.trainer, cli.datamodule
    phases = dm.num_train_phases
    assert trainer.current_epoch == phases == trainer.max_epochs, (trainer.current_epoch, phases)
    assert trainer.global_step >= phases  # every experience took optimizer steps
    metrics = json.loads((out / "metrics.json").read_text())
    matrix = metrics["matrix"]
    n_test = len(dm.test_classes_in_experience)
    assert len(matrix) == phases and all(len(row) == n_test for row in matrix), matrix
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for row in matrix for v in row), matrix
    assert metrics["scenario"] == dm.scenario


@pytest.mark.parametrize("config", CONFIGS)
def test_config_holds_no_machine_path(config: str) -> None:
    """Configs name models and data by ``hf:``/``timm:``/``data:`` names and find dataset roots
    themselves: no absolute or home-relative path in any value or comment."""
    text = (ROOT / config).read_text()
    found = [m.group(0) for m in MACHINE_PATH.finditer(text)]
    assert not found, f"{config} holds machine paths: {found}"

    def values(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for x in node.values() for v in values(x)]
        if isinstance(node, list):
            return [v for x in node for v in values(x)]
        return [node] if isinstance(node, str) else []

    for value in values(yaml.safe_load(text)):
        bare = re.sub(r"^(?:hf|timm|data):", "", value)
        assert not (os.path.isabs(bare) or bare.startswith("~")), f"{config}: absolute path {value!r}"
