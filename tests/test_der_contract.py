"""The buffer contract with DER: FPF / k-FPF read DER's buffer (k-FPF-KD its logits), DER's replay
forwards are announced to k-FPF-KD and LoRAMoE, conflicting batch extenders and ambiguous readers
raise, and ExperienceReplay's class-balanced buffer option."""

from __future__ import annotations

import types
import warnings
from contextlib import contextmanager

import lightning.pytorch as pl
import pytest
import torch

from callbacks import DER, DERPP, FPF, KFPF, ContinualCallback, ExperienceReplay, LoRAMoE
from cl_plugins import ContinualClassifier
from cl_plugins.buffer_contract import ReplayForwardListener, find_buffer_provider
from cl_plugins.buffers import ClassBalancedBuffer
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs


def _fit(callbacks, model=None, n_experiences=2, batch_size=16, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=n_experiences, epochs_per_experience=1, batch_size=batch_size)
    model = model or ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, **trainer_kwargs))
    trainer.fit(model, datamodule=dm)
    return trainer, model


def test_fpf_reads_ders_buffer_and_kfpf_kd_its_logits():
    der = DERPP(buffer_size=64, replay_batch_size=8)
    fpf = FPF(iterations=4, batch_size=8)  # buffer_from="auto"
    _fit([fpf, der], limit_val_batches=0)
    assert fpf.shares_buffer and fpf.buffer is der.buffer and fpf.phases_done == 1
    assert fpf.state_dict()["buffer_owner"] == "DERPP"

    der = DER(buffer_size=64)
    kd = KFPF(k=1, iterations=3, batch_size=8, variant="kd", buffer_from="replay")
    drawn = []
    original = kd._draw
    kd._draw = types.MethodType(lambda self, buf, dev: drawn.append(original(buf, dev)) or drawn[-1], kd)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*twice the memory")  # DER's buffer serves KD: no own buffer
        _fit([kd, der], limit_train_batches=4, limit_val_batches=0)
    assert kd.shares_buffer and kd.own_buffer is None and kd.phases_done == 1
    assert len(drawn) == 3 and all("logits" in b and b["logits"].shape == (8, 10) for b in drawn)
    auto = KFPF(k=1, iterations=2, variant="kd", buffer_from="auto")
    _fit([auto, DER(buffer_size=64)], limit_train_batches=2, limit_val_batches=0)
    assert auto.shares_buffer


def test_kfpf_kd_keeps_the_training_forwards_logits_not_ders_replay_outputs():
    """DER first: its hook runs the replay forwards inside the training forward, before k-FPF's hook
    sees that forward's output. k-FPF-KD, told of the replay forwards, keeps the training logits."""
    der = DERPP(buffer_size=400, replay_batch_size=8)
    kd = KFPF(k=1, iterations=1, buffer_size=400, variant="kd", buffer_from="own", sensitivity="off")
    _fit([der, kd], limit_train_batches=6, limit_val_batches=0)
    a, b = der.buffer, kd.buffer
    assert a.num_seen == b.num_seen == len(a) == len(b) == 2 * 6 * 16  # both hold every sample, in order
    assert torch.equal(a.data["x"], b.data["x"])
    assert torch.equal(a.data["logits"], b.data["logits"])


class TypeListener(ContinualCallback, ReplayForwardListener):
    """Records, for each replay forward, the labels of its samples and the types LoRAMoE gave them."""

    def __init__(self, moe: LoRAMoE) -> None:
        super().__init__()
        self.moe = moe
        self.seen: list[tuple[list[int], list[int]]] = []
        self._labels: list[int] | None = None

    def on_fit_start(self, trainer, pl_module):
        pl_module.net.blocks[0].mlp.fc1.register_forward_hook(self._hook)

    @contextmanager
    def replay_forward_context(self, samples):
        self._labels = samples["y"].tolist()
        try:
            yield
        finally:
            self._labels = None

    def _hook(self, module, args, output):
        if self._labels is not None:
            self.seen.append((self._labels, self.moe.context.last_types.tolist()))


def test_loramoe_types_the_samples_of_ders_replay_forwards():
    vit = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                              backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2),
                              optimizer="adam", lr=3e-3)
    moe = LoRAMoE(num_experts=4)
    der = DERPP(buffer_size=64, replay_batch_size=8)
    listener = TypeListener(moe)
    trainer, _ = _fit([moe, der, listener], model=vit, limit_train_batches=4, limit_val_batches=0)
    assert len(listener.seen) == 2 * (2 * 4 - 1)  # two replay forwards a step, from the second step on
    for labels, sample_types in listener.seen:  # classes 0-4: experience 0, type 0; classes 5-9: type 1
        assert len(labels) == 8 and sample_types == [int(y >= 5) for y in labels]
    assert {0, 1} <= {t for _, ts in listener.seen for t in ts}
    assert float(trainer.callback_metrics["loramoe/balance_loss"]) > 0


class _SecondReplay(ExperienceReplay):
    @property
    def state_key(self) -> str:
        return "second-replay"


def test_conflicts_and_ambiguity_raise_clear_errors():
    with pytest.raises(ValueError, match="DERPP must come before ExperienceReplay.*store only the current samples"):
        _fit([ExperienceReplay(buffer_size=32), DERPP(buffer_size=32)], limit_train_batches=1)
    with pytest.raises(ValueError, match=r"2 callbacks append buffer samples.*\(ExperienceReplay, _SecondReplay\)"):
        _fit([ExperienceReplay(buffer_size=32), _SecondReplay(buffer_size=16)], limit_train_batches=1)
    with pytest.raises(ValueError, match=r"found 2 callbacks that hold a replay buffer \(DERPP, ExperienceReplay\)"):
        _fit([FPF(), DERPP(buffer_size=32), ExperienceReplay(buffer_size=32)], limit_train_batches=1)
    trainer = types.SimpleNamespace(callbacks=[ExperienceReplay(buffer_size=8)])
    with pytest.raises(ValueError, match="needs the logits stored with each buffer sample, and ExperienceReplay's"):
        find_buffer_provider(trainer, object(), needs_logits=True)
    with pytest.raises(ValueError, match="there is none"):
        find_buffer_provider(types.SimpleNamespace(callbacks=[]), object(), required=True)
    # DER together with ER: DER first sees the original batch; both buffers fill from current samples
    der, er = DER(buffer_size=32), ExperienceReplay(buffer_size=32)
    _fit([der, er], limit_train_batches=3, limit_val_batches=0)
    assert der.buffer.num_seen == er.buffer.num_seen == 2 * 3 * 16


def test_experience_replay_class_balanced_option():
    er = ExperienceReplay(buffer_size=40, replay_batch_size=8, buffer="class_balanced")
    _fit([er], n_experiences=5, limit_val_batches=0)
    assert isinstance(er.buffer, ClassBalancedBuffer) and len(er.buffer) == 40
    counts = torch.bincount(er.buffer.data["y"], minlength=10).tolist()
    assert counts == [4] * 10  # ten classes of about 140 samples each: equal shares of 40
    with pytest.raises(ValueError, match="replay_batch_size=64 exceeds buffer_size=40"):
        ExperienceReplay(buffer_size=40, replay_batch_size=64)
