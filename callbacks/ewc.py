"""Online EWC (Schwarz et al. 2018) as a Lightning callback, following Mammoth's ``models/ewc_on.py``.

At the end of every experience the callback estimates the diagonal Fisher over that experience's
training data (:mod:`cl_plugins.baselines.ewc`), folds it into ``F <- gamma * F + F_new`` and
anchors the parameters; every later training step adds ``e_lambda * sum_k F_k (theta_k - theta*_k)^2``
through the aux-loss op (:mod:`callbacks.quadratic`), logged as ``ewc/penalty``.

The Fisher pass runs over the experience's training dataset in order (its training transforms
included, as Mammoth's pass over the task's train loader), with the model in eval mode, autocast
off (float32 statistics) and the global RNG state forked, so it does not change the randomness of
the rest of training. Under DDP each rank takes every ``world``-th sample, and the sums and the
sample count are all-reduced: every rank ends with the same Fisher, that of the whole experience.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from callbacks.quadratic import QuadraticPenalty
from cl_plugins.baselines.ewc import FisherMode, PerSampleMethod, check_ewc_hparams, empirical_fisher, online_fisher


class OnlineEWC(QuadraticPenalty):
    """Online Elastic Weight Consolidation.

    Args:
        e_lambda: weight of the penalty (Mammoth's ``--e_lambda``; its best args: 90 on Seq-MNIST,
            10 on Seq-CIFAR-10).
        gamma: decay of the accumulated Fisher at each new experience, in ``(0, 1]`` (best args: 1.0).
        fisher: ``"per_sample"`` (Mammoth: ``p(y|x) * (grad log p(y|x))^2`` averaged over the samples)
            or ``"batch"`` (Avalanche: the squared gradient of each batch's mean loss, averaged over batches).
        fisher_batch_size: batch size of the Fisher pass. Default: the stream's training batch size for
            ``"batch"`` (it defines that estimator), its evaluation batch size for ``"per_sample"`` (the value
            does not depend on it; larger batches are faster, and ``"vmap"`` holds ``batch x parameters`` floats).
        fisher_method: how the per-sample gradients are computed, all exact (see
            :func:`~cl_plugins.baselines.ewc.fisher_per_sample`): ``"auto"`` (one batched backward when every
            regularized parameter is in an ``nn.Linear``, else ``torch.func.vmap``), ``"linear"``, ``"vmap"``, or
            ``"loop"`` (one backward per sample, as Mammoth, for models that ``vmap`` cannot handle).

    In task-incremental streams the Fisher uses the logits as the module's ``masked_logits`` masks
    them in training (the classification mixin's task masking), so it is the Fisher of the trained
    objective.
    """

    term_name = "ewc/penalty"

    def __init__(
        self,
        e_lambda: float = 90.0,
        gamma: float = 1.0,
        fisher: FisherMode = "per_sample",
        fisher_batch_size: int | None = None,
        fisher_method: PerSampleMethod = "auto",
    ) -> None:
        check_ewc_hparams(e_lambda, gamma)
        if fisher not in ("per_sample", "batch"):
            raise ValueError(f"fisher must be 'per_sample' (Mammoth) or 'batch' (Avalanche), got {fisher!r}")
        if fisher_batch_size is not None and fisher_batch_size < 1:
            raise ValueError(f"fisher_batch_size must be >= 1, got {fisher_batch_size}")
        super().__init__(e_lambda)
        self.gamma = float(gamma)
        self.fisher_mode: FisherMode = fisher
        self.fisher_batch_size = fisher_batch_size
        if fisher_method not in ("auto", "linear", "vmap", "loop"):
            raise ValueError(f"fisher_method must be 'auto', 'linear', 'vmap' or 'loop', got {fisher_method!r}")
        self.fisher_method: PerSampleMethod = fisher_method

    @property
    def e_lambda(self) -> float:
        """The penalty weight."""
        return self.weight

    @property
    def fisher(self) -> dict[str, Tensor] | None:
        """The accumulated Fisher diagonal by parameter name (``None`` before the first experience end)."""
        return self.importance

    # ------------------------------------------------------------------ the Fisher pass
    def _batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader
                 ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        task_il = self.stream(trainer).scenario == "task" and callable(getattr(pl_module, "masked_logits", None))
        for batch in loader:
            batch = trainer.strategy.batch_to_device(batch)
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("OnlineEWC's Fisher pass needs training batches (x, y[, task_label])")
            x = trainer.precision_plugin.convert_input(batch[0])
            y = batch[1]
            keep = None
            if task_il and len(batch) > 2:
                with torch.no_grad():
                    logits = pl_module(x)
                    keep = pl_module.masked_logits(torch.zeros_like(logits), batch[2], evaluation=False) == 0
            yield x, y, keep

    def compute_fisher(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> dict[str, Tensor]:
        """The Fisher diagonal of ``experience``'s training data at the current parameters (not accumulated)."""
        dm = self.stream(trainer)
        dataset = dm.train_dataset(experience)
        rank, world = trainer.global_rank, trainer.world_size
        if world > 1:
            dataset = Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
        batch_size = self.fisher_batch_size or (dm.batch_size if self.fisher_mode == "batch" else dm.eval_batch_size)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=dm.num_workers)
        device = pl_module.device
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                sums, count = empirical_fisher(pl_module, self.params, self._batches(trainer, pl_module, loader),
                                               self.fisher_mode, self.fisher_method)
        finally:
            for m, mode in modes:
                m.training = mode
        names = list(sums)
        flat = torch.cat([sums[n].reshape(-1) for n in names] + [torch.tensor([float(count)], device=device)])
        if world > 1:
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
        total = float(flat[-1])
        if total == 0:
            raise RuntimeError(f"OnlineEWC: experience {experience} has no training data to estimate the Fisher on")
        out, offset = {}, 0
        for n in names:
            k = sums[n].numel()
            out[n] = (flat[offset:offset + k] / total).view_as(sums[n])
            offset += k
        return out

    # ------------------------------------------------------------------ experiences
    def on_experience_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, experience: int) -> None:
        new = self.compute_fisher(trainer, pl_module, experience)
        self.importance = online_fisher(self.importance, new, self.gamma)
        self.anchors = self.snapshot()
        self.consolidations += 1
