"""FPF / k-FPF reading ExperienceReplay's buffer (``buffer_from``), and the warning for a phase
``transform`` on top of a stream that already augments."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ExperienceReplay
from callbacks.kfpf import FPF, KFPF
from cl_plugins import ContinualClassifier
from datamodules import SplitCIFAR10, SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StopAfter


def _fit(callbacks, epochs=1, dm=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = dm or SplitDigits(n_experiences=5, epochs_per_experience=epochs, batch_size=32)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, backbone_kwargs={"width": 8})
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, **trainer_kwargs))
    trainer.fit(model, datamodule=dm)
    return trainer, model


class SpyFPF(FPF):
    """Records every phase batch, the model and the replay buffer's generator around the phase."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.drawn, self.rng = [], []
        self.before_phase = None

    def _draw(self, buffer, device):
        batch = super()._draw(buffer, device)
        self.drawn.append({k: v.clone() for k, v in batch.items()})
        return batch

    def run_phase(self, trainer, pl_module):
        self.before_phase = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.rng.append(self.buffer.generator.get_state().clone())
        result = super().run_phase(trainer, pl_module)
        self.rng.append(self.buffer.generator.get_state().clone())
        return result


def test_fpf_after_replay_fine_tunes_on_replays_buffer_and_holds_none():
    er_alone = ExperienceReplay(buffer_size=64)
    _, model_er = _fit([er_alone])

    er = ExperienceReplay(buffer_size=64)
    fpf = SpyFPF(iterations=6, batch_size=16)  # buffer_from="auto": shares the ER buffer
    _, model = _fit([fpf, er])
    assert fpf.shares_buffer and fpf.buffer_source == "replay"
    assert fpf.own_buffer is None and fpf.buffer is er.buffer
    assert fpf.state_dict()["buffer"] is None  # the owner saves the shared buffer
    assert fpf.phases_done == 1 and len(fpf.drawn) == 6
    assert er.buffer.num_seen == 1348  # ER alone filled it, with current samples only

    def rows(fields, n):
        return torch.cat([fields[k][:n].reshape(n, -1).float() for k in ("x", "y", "t")], dim=1)

    slots = rows(er.buffer.data, len(er.buffer))
    for batch in fpf.drawn:  # every phase sample is a slot of the replay buffer, drawn without replacement
        assert batch["x"].shape[0] == 16 and set(batch) == {"x", "y", "t"}
        match = (rows(batch, 16)[:, None, :] == slots[None, :, :]).all(dim=2)
        assert bool(match.any(dim=1).all())
        assert len({int(match[i].nonzero()[0]) for i in range(16)}) == 16
    # FPF draws with its own generator: the replay run is unchanged, FPF adds one phase on top
    assert torch.equal(fpf.rng[0], fpf.rng[1])
    for key, value in model_er.state_dict().items():
        assert torch.equal(fpf.before_phase[key], value), key
    for key, value in er_alone.buffer.data.items():
        assert torch.equal(er.buffer.data[key], value), key
    assert not torch.equal(model.state_dict()["net.head.weight"], model_er.state_dict()["net.head.weight"])


def test_fpf_without_replay_or_with_kd_builds_its_own_buffer():
    fpf = FPF(iterations=2, buffer_size=32)
    _fit([fpf], limit_train_batches=1, limit_val_batches=0)
    assert not fpf.shares_buffer and fpf.own_buffer is not None and fpf.buffer.num_seen == 5 * 32
    kd = FPF(iterations=2, buffer_size=32, variant="kd")
    with pytest.warns(UserWarning, match="twice the memory"):
        _fit([kd, ExperienceReplay(buffer_size=32)], limit_train_batches=1, limit_val_batches=0)
    assert not kd.shares_buffer and kd.own_buffer is not None and kd.own_buffer.store_logits
    forced = KFPF(k=1, iterations=2, buffer_from="replay")
    _fit([forced, ExperienceReplay(buffer_size=32)], limit_train_batches=1, limit_val_batches=0)
    assert forced.shares_buffer and forced.own_buffer is None and forced.phases_done == 1


class _SecondReplay(ExperienceReplay):
    """A second replay callback with its own checkpoint key (Lightning refuses two equal keys)."""

    @property
    def state_key(self) -> str:
        return "second-replay"


def test_shared_buffer_configuration_errors_say_what_to_change():
    with pytest.raises(ValueError, match="cannot be used with variant='kd'.*ExperienceReplay's buffer stores none"):
        _fit([FPF(buffer_from="replay", variant="kd"), ExperienceReplay(buffer_size=32)], limit_train_batches=1)
    with pytest.raises(ValueError, match="buffer_from must be one of"):
        FPF(buffer_from="replay_buffer")
    with pytest.raises(ValueError, match="needs an ExperienceReplay callback"):
        _fit([FPF(buffer_from="replay")], limit_train_batches=1)
    with pytest.raises(ValueError, match=r"ExperienceReplay's buffer \(32 samples\), but buffer_size=500"):
        _fit([FPF(buffer_size=500), ExperienceReplay(buffer_size=32)], limit_train_batches=1)
    with pytest.raises(ValueError, match=r"found 2 callbacks that hold a replay buffer \(ExperienceReplay, _Second"):
        _fit([FPF(), ExperienceReplay(buffer_size=32), _SecondReplay(buffer_size=16, seed=1)],
             limit_train_batches=1)
    with pytest.raises(RuntimeError, match="chooses its buffer when the Trainer sets it up"):
        FPF().buffer  # noqa: B018
    # a checkpoint of a shared-buffer run cannot resume into a run with its own buffer
    shared = FPF(iterations=2)
    _fit([shared, ExperienceReplay(buffer_size=32)], limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="used ExperienceReplay's buffer, but this run uses a buffer of its own"):
        KFPF(k=1, at_end=True).load_state_dict(shared.state_dict())


def _resume_run(make, tmp: Path, stop_after=None, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    dm = SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=32)
    model = ContinualClassifier("small_cnn", num_classes=10, lr=0.05, momentum=0.9, backbone_kwargs={"width": 8})
    cb, er = make(), ExperienceReplay(buffer_size=64)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    callbacks = [cb, er, ckpt] + ([StopAfter(stop_after)] if stop_after is not None else [])
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp,
                                                limit_val_batches=1))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, cb, er


@pytest.mark.parametrize("make", [
    lambda: FPF(iterations=10),
    lambda: KFPF(k=3, iterations=10, buffer_from="replay"),  # a phase before the checkpoint, two after
], ids=["FPF", "KFPF-k3"])
def test_shared_buffer_resumes_exactly(make, tmp_path):
    _, model_u, cb_u, er_u = _resume_run(make, tmp_path / "full")
    _resume_run(make, tmp_path / "stopped", stop_after=1)
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=3.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith(("FPF", "KFPF")))
    assert saved["buffer"] is None and saved["buffer_source"] == "replay"  # ER's state holds the samples
    trainer_b, model_b, cb_b, er_b = _resume_run(make, tmp_path / "resumed", ckpt_path=str(ckpt))
    assert trainer_b.global_step == 90 and cb_b.shares_buffer and cb_b.buffer is er_b.buffer
    assert cb_b.phase_log == cb_u.phase_log and cb_b.phases_done == cb_u.phases_done
    for key, value in er_u.buffer.data.items():
        assert torch.equal(er_b.buffer.data[key], value), key
    assert torch.equal(er_b.buffer.generator.get_state(), er_u.buffer.generator.get_state())
    assert torch.equal(cb_b._sample_generator.get_state(), cb_u._sample_generator.get_state())
    for (name, p_u), p_b in zip(model_u.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(p_b, p_u, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- augmentation
def _double_augmentation_warnings(cb, dm) -> list[str]:
    trainer = types.SimpleNamespace(datamodule=dm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb._warn_double_augmentation(trainer)
    return [str(w.message) for w in caught if "augmented twice" in str(w.message)]


def test_transform_on_an_augmenting_stream_warns_at_setup():
    flip = lambda x: x.flip(-1)  # noqa: E731
    # the real datamodule attribute (no data is loaded to read it)
    assert _double_augmentation_warnings(KFPF(transform=flip), SplitCIFAR10(augment=True))
    assert not _double_augmentation_warnings(KFPF(transform=flip), SplitCIFAR10(augment=False))
    assert not _double_augmentation_warnings(KFPF(), SplitCIFAR10(augment=True))
    # wired into setup: raised before training, with what happens and how to fix it
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=32)
    dm.augment = True
    with pytest.warns(UserWarning, match=r"augment=True.*augmented twice.*transform=None"):
        _fit([KFPF(k=1, iterations=1, buffer_size=16, transform=flip)], dm=dm, limit_train_batches=1,
             limit_val_batches=0)
