"""OnlineEWC on a tiny stream: less forgetting than naive, the Fisher pass over the whole experience,
no side effect on training, the online accumulation, clear errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks import OnlineEWC
from cl_plugins import ContinualClassifier
from cl_plugins.baselines import empirical_fisher
from datamodules import SplitDigits
from tests.conftest import quiet_trainer_kwargs
from tests.helpers import StopAfter

MLP = dict(backbone="mlp", input_shape=(1, 8, 8), backbone_kwargs={"hidden": 64})
MLP_DROPOUT = dict(backbone="mlp", input_shape=(1, 8, 8), backbone_kwargs={"hidden": 32, "dropout": 0.3})


class ExperienceLosses(pl.Callback):
    """``val/loss_exp0`` after each experience (the validation of its last epoch)."""

    def __init__(self, epochs: int) -> None:
        self.epochs, self.loss0 = epochs, []

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch % self.epochs == self.epochs - 1:
            self.loss0.append(float(trainer.callback_metrics["val/loss_exp0"]))


def fit(callbacks, stop_after=None, scenario="task", epochs=3, lr=0.1, seed=0, model_kwargs=MLP, n_experiences=5,
        **trainer_kwargs):
    pl.seed_everything(seed, verbose=False)
    dm = SplitDigits(n_experiences=n_experiences, epochs_per_experience=epochs, batch_size=16, scenario=scenario)
    model = ContinualClassifier(num_classes=10, lr=lr, **model_kwargs)
    extra = [] if stop_after is None else [StopAfter(stop_after)]
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=list(callbacks) + extra, **trainer_kwargs))
    trainer.fit(model, datamodule=dm)
    return trainer, model, dm


def forgetting(callbacks) -> float:
    """Rise of the task-IL test loss of experience 0 while training experience 1."""
    losses = ExperienceLosses(3)
    fit([*callbacks, losses], stop_after=1)
    assert len(losses.loss0) == 2
    return losses.loss0[1] - losses.loss0[0]


def test_online_ewc_reduces_forgetting_in_task_il():
    naive = forgetting([])
    ewc = OnlineEWC(e_lambda=200.0)
    with_ewc = forgetting([ewc])
    # measured (seeds 0, 1, 2): naive 0.046 / 0.141 / 0.024, oEWC 0.030 / 0.066 / 0.004 (ratio 0.65 / 0.47 / 0.17)
    assert naive > 0.02, naive
    assert with_ewc < 0.8 * naive, (naive, with_ewc)
    assert ewc.consolidations == 2 and set(ewc.fisher) == {n for n, _ in ewc.params.items()}


def test_zero_lambda_leaves_training_exactly_naive():
    """The Fisher pass runs (eval mode, forked RNG) without touching what training sees: dropout masks,
    train mode and data order stay those of the naive run."""
    _, naive, _ = fit([], stop_after=1, model_kwargs=MLP_DROPOUT, epochs=2)
    ewc = OnlineEWC(e_lambda=0.0)
    _, model, _ = fit([ewc], stop_after=1, model_kwargs=MLP_DROPOUT, epochs=2)
    assert ewc.fisher is not None and ewc.consolidations == 2
    for (name, a), b in zip(naive.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["per_sample", "batch"])
def test_fisher_covers_the_whole_experience_in_eval_mode_with_the_task_mask(mode):
    ewc = OnlineEWC(e_lambda=1.0, fisher=mode)
    _, model, dm = fit([ewc], stop_after=0, model_kwargs=MLP_DROPOUT, epochs=2)  # stops right after the pass
    data = dm.train_dataset(0)
    keep = torch.zeros(10, dtype=torch.bool)
    keep[list(dm.classes_in_experience[0])] = True
    batches = [(x, y, keep.expand(len(y), 10)) for x, y, _ in DataLoader(data, batch_size=16)]
    model.eval()
    sums, count = empirical_fisher(model, dict(model.named_parameters()), batches, mode)
    assert count == (len(data) if mode == "per_sample" else len(batches))
    for name, value in sums.items():
        torch.testing.assert_close(ewc.fisher[name], value / count, rtol=1e-5, atol=1e-9, msg=name)
        torch.testing.assert_close(ewc.anchors[name], model.get_parameter(name).detach(), rtol=0, atol=0)


def test_fisher_accumulates_online_with_gamma():
    class Keep(pl.Callback):  # after OnlineEWC in the list: sees its state at each experience end
        def __init__(self, ewc):
            self.ewc, self.fishers = ewc, []

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.datamodule.is_experience_end(trainer.current_epoch):
                self.fishers.append({n: f.clone() for n, f in self.ewc.fisher.items()})

    ewc = OnlineEWC(e_lambda=10.0, gamma=0.5)
    keep = Keep(ewc)
    trainer, model, _ = fit([ewc, keep], stop_after=1, epochs=2)
    new = ewc.compute_fisher(trainer, model, 1)  # the parameters are still those of the end of experience 1
    first = keep.fishers[0]
    for name in first:
        torch.testing.assert_close(keep.fishers[1][name], 0.5 * first[name] + new[name], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(new["net.head.weight"], first["net.head.weight"])


def test_penalty_is_logged_from_the_second_experience():
    trainer, _, _ = fit([OnlineEWC(e_lambda=5.0)], stop_after=0, epochs=1)
    assert "ewc/penalty" not in trainer.callback_metrics  # nothing to anchor to in the first experience
    trainer, _, _ = fit([OnlineEWC(e_lambda=5.0)], stop_after=1, epochs=1)
    assert float(trainer.callback_metrics["ewc/penalty"]) > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"e_lambda": -1.0}, "e_lambda"), ({"gamma": 0.0}, "gamma"), ({"gamma": 1.01}, "gamma"),
    ({"fisher": "exact"}, "per_sample"), ({"fisher_batch_size": 0}, "fisher_batch_size"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineEWC(**kwargs)


def test_composes_with_replay_and_the_other_baselines_on_a_batchnorm_cnn():
    """ER extends the batch, LwF distils it, oEWC and SI add their penalties: one backward carries all
    of them (a CNN, so the Fisher takes the vmap path, in eval mode for BatchNorm)."""
    from callbacks import ExperienceReplay, LwF, SynapticIntelligence

    cnn = dict(backbone="small_cnn", backbone_kwargs={"width": 8})
    cbs = [ExperienceReplay(buffer_size=64, replay_batch_size=8), OnlineEWC(e_lambda=10.0),
           SynapticIntelligence(c=1.0), LwF(alpha=1.0, warmup_epochs=1)]
    trainer, model, _ = fit(cbs, stop_after=1, scenario="class", epochs=1, lr=0.05, model_kwargs=cnn,
                            accumulate_grad_batches=2)
    for term in ("ewc/penalty", "si/penalty", "lwf/distill"):
        assert torch.isfinite(trainer.callback_metrics[term]), term
    assert cbs[1].fisher["net.conv1.weight"].abs().sum() > 0 and cbs[2].importance is not None
