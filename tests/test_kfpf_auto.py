"""k-FPF ``modules="auto"``: the rule by hand, what it picks on a conv net, a timm ViT and a BERT, and
that a resumed run fine-tunes the modules chosen before the checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import callbacks.kfpf as kfpf_module
from callbacks.kfpf import KFPF
from cl_plugins import ContinualClassifier
from cl_plugins.kfpf.auto import (
    AutoChoice,
    choose_groups,
    relative_scores,
    select_by_sensitivity,
    selection_from_groups,
)
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StopAfter
from tests.test_loramoe import BERT_CFG, VIT_KW, _token_stream


# ---------------------------------------------------------------------------------------------- the rule
def _entry(epoch: int, experience: int, **scores: float) -> dict:
    return {"epoch": epoch, "experience": experience, "scores": scores}


def test_relative_scores_use_the_task_boundary_epochs_by_hand():
    history = [
        _entry(0, 0, a=1.0, b=2.0, c=4.0, d=0.0),
        _entry(1, 1, a=10.0, b=2.0, c=1.0, d=0.0),  # boundary: median of the moved (10, 2, 1) is 2
        _entry(2, 1, a=0.1, b=9.0, c=1.0, d=0.0),  # within experience 1: not used
        _entry(3, 2, a=6.0, b=3.0, c=3.0, d=0.0),  # boundary: median 3
    ]
    scores, epochs, boundary = relative_scores(history)
    assert boundary and epochs == [1, 3]
    assert scores == pytest.approx({"a": (5.0 + 2.0) / 2, "b": 1.0, "c": (0.5 + 1.0) / 2, "d": 0.0})
    # before any boundary: every scored epoch (here the first, median 2)
    scores, epochs, boundary = relative_scores(history[:1])
    assert not boundary and epochs == [0] and scores == pytest.approx({"a": 0.5, "b": 1.0, "c": 2.0, "d": 0.0})
    # nothing scored yet: the epoch in progress
    scores, epochs, _ = relative_scores([], current={"a": 3.0, "b": 1.0})
    assert epochs == [-1] and scores == pytest.approx({"a": 1.5, "b": 0.5})


def test_choose_groups_by_score_within_the_budget_by_hand():
    scores = {"a": 3.5, "e": 3.0, "f": 2.5, "f.running_stats": 2.2, "b": 1.0}
    sizes = {"a": 10, "e": 50, "f": 5, "f.running_stats": 5, "b": 1}
    # budget 20 of 100 parameters: a (10), e does not fit (60), f (15), f's statistics (same module: free)
    assert choose_groups(scores, sizes, threshold=2.0, budget=0.2, total=100) == ["a", "f", "f.running_stats"]
    assert choose_groups(scores, sizes, threshold=3.2, budget=1.0, total=100) == ["a"]


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(3))
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


def test_groups_select_their_modules_and_a_norm_as_one_unit():
    model = _Toy()
    history = [_entry(0, 0, **{"<root>": 1.0, "body.0": 1.0, "body.1": 1.0, "body.1.running_stats": 1.0,
                               "body.2": 1.0, "head": 1.0}),
               _entry(1, 1, **{"<root>": 9.0, "body.0": 1.0, "body.1": 0.5, "body.1.running_stats": 8.0,
                               "body.2": 1.0, "head": 30.0})]
    sel, choice = select_by_sensitivity(model, history, threshold=1.5, budget=0.5)
    # epoch 1 only (the boundary): median of (9, 1, 0.5, 8, 1, 30) is 4.5, so <root> 2.0x, the BN's
    # statistics 1.8x, the head 6.7x (always taken, not ranked); 3 + 8 of 57 parameters
    assert choice.groups == ["<root>", "body.1.running_stats"] and choice.head == "head"
    assert set(sel.params) == {"token", "body.1.weight", "body.1.bias", "head.weight", "head.bias"}
    assert set(sel.norm_with_stats) == {"body.1"}  # its statistics are re-estimated, its affine trained
    assert sel.reasons["body.1"] == "auto:1.8x" and sel.reasons["head"] == "head"
    assert choice.params == 3 + 8 and choice.total_params == 57
    assert "head head 6.7x (always)" in choice.describe()
    assert AutoChoice.from_dict(choice.to_dict()) == choice
    with pytest.raises(ValueError, match="selected nothing"):
        selection_from_groups(model, [], {}, head=False)


# ---------------------------------------------------------------------------------------------- in training
def _fit(model, dm, cb, **kwargs):
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[cb], limit_val_batches=1, **kwargs))
    trainer.fit(model, datamodule=dm)
    return trainer


def test_conv_net_gets_the_fixed_lists_kind_of_modules():
    """Small CNN (conv1, bn1, conv2, bn2, head), SGD: the choice is the head and the BatchNorm layers,
    i.e. inside the fixed list (head, norms, first conv); the deep conv is shared and left out."""
    pl.seed_everything(0, verbose=False)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    cb = KFPF(k=1, iterations=5, buffer_size=64, modules="auto")
    _fit(model, SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32), cb)
    chosen = set(cb.selection.reasons)
    assert chosen <= {"net.head", "net.bn1", "net.bn2", "net.conv1"}, chosen
    assert "net.head" in chosen and {"net.bn1", "net.bn2"} & chosen
    assert "net.conv2.weight" not in cb.selection.params
    assert cb.auto_choice.boundary and cb.auto_choice.epochs == [1, 2, 3, 4]


def test_timm_vit_gets_head_final_norm_and_no_mlp_or_qkv():
    pl.seed_everything(0, verbose=False)
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=VIT_KW, lr=0.05)
    cb = KFPF(k=1, iterations=5, buffer_size=64, modules="auto")
    _fit(model, SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32), cb)
    params = set(cb.selection.params)
    assert {"net.head.weight", "net.norm.weight", "net.norm.bias"} <= params
    assert not [p for p in params if ".mlp." in p or ".qkv." in p], params
    assert cb.auto_choice.params <= 0.1 * cb.auto_choice.total_params


def test_bert_gets_classifier_and_layer_norms_and_no_ffn_or_attention_weights():
    pl.seed_everything(0, verbose=False)
    model = ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG, lr=0.05)
    cb = KFPF(k=1, iterations=5, buffer_size=64, modules="auto")
    _fit(model, _token_stream(), cb)
    params = set(cb.selection.params)
    assert "net.model.classifier.weight" in params
    norms = {p for p in params if p.endswith("LayerNorm.weight")}
    assert len(norms) >= 3, params
    assert not [p for p in params if ".intermediate." in p or ".attention.self." in p
                or (".output.dense." in p and "attention" not in p)], params


def test_flat_scores_fall_back_to_the_head_with_a_warning():
    """Adam moves every parameter by about the learning rate, and a ViT keeps no running statistics
    (which move whatever the optimizer): no module reaches 2x the median."""
    pl.seed_everything(0, verbose=False)
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=VIT_KW, optimizer="adam", lr=3e-3)
    cb = KFPF(k=1, iterations=2, buffer_size=64, modules="auto")
    with pytest.warns(UserWarning, match="no module reached 2x"):
        _fit(model, SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32), cb)
    assert cb.auto_choice.groups == [] and set(cb.selection.reasons) == {"net.head"}


# ---------------------------------------------------------------------------------------------- resume
def _resume_run(tmp: Path, stop_after: int | None = None, ckpt_path: str | None = None):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    cb = KFPF(k=2, iterations=5, buffer_size=64, modules="auto")
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    callbacks = [cb, ckpt] + ([StopAfter(stop_after)] if stop_after is not None else [])
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp,
                                                limit_val_batches=1))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, cb


def test_resumed_run_fine_tunes_the_checkpointed_choice(tmp_path, monkeypatch):
    """The choice is made at the first phase (step 22 of 45, in experience 2) and saved; a run resumed
    after it rebuilds the same selection from the checkpoint without choosing again."""
    model_u, cb_u = _resume_run(tmp_path / "full")
    _, cb_a = _resume_run(tmp_path / "stopped", stop_after=2)
    assert cb_a.phases_done == 1 and cb_a.auto_choice == cb_u.auto_choice

    def no_second_choice(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the checkpoint's choice")

    monkeypatch.setattr(kfpf_module, "select_by_sensitivity", no_second_choice)
    model_b, cb_b = _resume_run(tmp_path / "resumed", ckpt_path=str(tmp_path / "stopped" / "ckpt" / "epoch=2.ckpt"))
    assert cb_b.phases_done == 2 and cb_b.auto_choice == cb_u.auto_choice
    assert set(cb_b.selection.params) == set(cb_u.selection.params)
    assert cb_b.selection.reasons == cb_u.selection.reasons
    for (name, p_u), p_b in zip(model_u.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(p_b, p_u, rtol=0, atol=0, msg=name)
    # a checkpoint with an automatic choice cannot resume with the fixed list silently
    fixed = KFPF(k=2, iterations=5, buffer_size=64)
    fixed.buffer_source = "own"
    with pytest.raises(ValueError, match="resume with modules='auto'"):
        fixed.load_state_dict(cb_u.state_dict())
