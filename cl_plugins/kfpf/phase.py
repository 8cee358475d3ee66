"""The FPF phase: fine-tune only the selected modules on buffer batches, then restore everything.

k-FPF (Zhao et al., ICML 2023) trains on current data with plain SGD and, ``k`` times over the
whole stream (every ``tau = floor(N_total / k)`` optimizer steps, regardless of task
boundaries), runs ``M`` iterations on replay-buffer batches in which only the forgetting-prone
modules are trainable. FPF is one such phase at the end of any method.

:func:`phase_schedule` gives the optimizer steps that trigger a phase,
:func:`stream_optimizer_steps` counts ``N_total`` from the stream, and :func:`run_fpf_phase` runs
one phase with its own fresh SGD optimizer: the caller's optimizer, scheduler and gradients are
never touched, and every ``requires_grad`` flag, train/eval mode and ``.grad`` is restored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_plugins.kfpf.selection import ModuleSelection, has_running_stats


# ---------------------------------------------------------------------------------------------- schedule
def optimizer_steps_per_epoch(
    num_samples: int, batch_size: int, world_size: int = 1, accumulate: int = 1, limit_batches: int | float = 1.0
) -> int:
    """Optimizer steps of one epoch over ``num_samples``: batches per rank (the distributed sampler
    pads every rank to ``ceil(n / world)``), cut by Lightning's ``limit_train_batches``, then
    ``ceil(batches / accumulate)`` since Lightning also steps on an epoch's last, partial window."""
    if batch_size < 1 or world_size < 1 or accumulate < 1:
        raise ValueError(
            f"batch_size, world_size, accumulate must be >= 1, got {batch_size}, {world_size}, {accumulate}"
        )
    batches = math.ceil(math.ceil(num_samples / world_size) / batch_size)
    if isinstance(limit_batches, float):
        batches = int(batches * limit_batches) if limit_batches < 1.0 else batches
    else:
        batches = min(batches, int(limit_batches))
    return math.ceil(batches / accumulate)


def stream_optimizer_steps(
    samples_per_epoch: Sequence[int],
    batch_size: int,
    world_size: int = 1,
    accumulate: int = 1,
    limit_batches: int | float = 1.0,
) -> int:
    """``N_total``: optimizer steps over a stream given the sample count of every epoch."""
    return sum(optimizer_steps_per_epoch(n, batch_size, world_size, accumulate, limit_batches)
               for n in samples_per_epoch)


def phase_schedule(total_steps: int, k: int, at_end: bool = True) -> list[int]:
    """Optimizer steps (1-based counts) after which the ``k`` phases run.

    Phase ``j`` (1..k) runs after ``j * tau`` steps with ``tau = floor(total_steps / k)``. With
    ``at_end`` the last phase moves to ``total_steps`` itself, so the final model is always
    fine-tuned (without it, up to ``k - 1`` trailing steps on current data follow the last phase).
    """
    if k < 1:
        raise ValueError(f"k (number of FPF phases) must be >= 1, got {k}")
    if total_steps < k:
        raise ValueError(
            f"k={k} FPF phases do not fit in {total_steps} optimizer steps: use k <= {total_steps} "
            "(or pass total_steps= if the count from the stream is wrong)"
        )
    tau = total_steps // k
    steps = [tau * (j + 1) for j in range(k)]
    if at_end:
        steps[-1] = total_steps
    return steps


# ---------------------------------------------------------------------------------------------- losses
def fpf_loss(logits: Tensor, targets: Tensor, ce_logits: Tensor | None = None,
             stored_logits: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """k-FPF-CE: ``CE(ce_logits, y)``; k-FPF-KD adds ``alpha * MSE(logits, stored_logits)`` (DER-style
    logit matching on the raw, unmasked logits). ``ce_logits`` defaults to ``logits`` (task-IL
    passes the task-masked logits). Computed in float32."""
    ce = F.cross_entropy((logits if ce_logits is None else ce_logits).float(), targets)
    if alpha == 0.0:
        return ce
    if stored_logits is None:
        raise ValueError(
            f"k-FPF-KD (alpha={alpha}) matches the logits stored with each buffer sample, but the buffer batch has "
            "none: use a buffer that stores logits (ReservoirBuffer(store_logits=True); KFPF(variant='kd') builds "
            "one), or alpha=0 for k-FPF-CE"
        )
    if stored_logits.shape != logits.shape:
        raise ValueError(
            f"k-FPF-KD: stored logits {tuple(stored_logits.shape)} and the model's logits {tuple(logits.shape)} "
            "differ in shape: the head's outputs must not change while the buffer holds logits"
        )
    return ce + alpha * F.mse_loss(logits.float(), stored_logits.float())


# ---------------------------------------------------------------------------------------------- modes
@contextmanager
def fine_tune_mode(model: nn.Module, selection: ModuleSelection, freeze_norm_stats: bool = False) -> Iterator[None]:
    """Only the selected parameters require gradients; normalization layers with running statistics
    are in train mode (statistics re-estimated) when selected and not frozen, else in eval mode.
    The selected parameters' ``.grad`` is set aside. Everything is restored on exit, errors too."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    selected = {id(p) for p in selection.params.values()}
    selected_stats = {id(m) for m in selection.norm_with_stats.values()}
    saved_grads = [(p, p.grad) for p in selection.params.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in selected)
        for p, _ in saved_grads:
            p.grad = None
        for m in model.modules():
            if has_running_stats(m):
                m.train(id(m) in selected_stats and not freeze_norm_stats)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        for p, g in saved_grads:
            p.grad = g


# ---------------------------------------------------------------------------------------------- one phase
@dataclass
class PhaseResult:
    """What one phase did."""

    iterations: int
    samples: int
    first_loss: float
    last_loss: float
    mean_loss: float


def _all_reduce_mean(tensors: Sequence[Tensor], reduce: Callable[[Tensor], Tensor]) -> None:
    """Averages ``tensors`` across ranks in one collective (flattened, in place)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    flat = reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def run_fpf_phase(
    model: nn.Module,
    selection: ModuleSelection,
    sample: Callable[[], dict[str, Tensor]],
    forward: Callable[[Tensor], Tensor],
    iterations: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    alpha: float = 0.0,
    mask: Callable[[Tensor, Tensor], Tensor] | None = None,
    freeze_norm_stats: bool = False,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    reduce: Callable[[Tensor], Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    lr_schedule: str = "constant",
) -> PhaseResult:
    """Runs ``iterations`` SGD steps on buffer batches over the selected parameters only.

    Args:
        model: the network (its parameters outside ``selection`` are frozen for the phase).
        selection: what to fine-tune (:func:`~cl_plugins.kfpf.selection.select_modules`).
        sample: returns a buffer batch ``{"x", "y", "t"[, "logits"]}`` on the model's device.
        forward: ``x -> raw logits``.
        iterations: ``M``.
        lr, momentum, weight_decay: of the phase's own, fresh ``torch.optim.SGD``.
        alpha: weight of the logit-matching term (k-FPF-KD); 0 gives k-FPF-CE.
        mask: ``(logits, task_labels) -> logits`` for the cross-entropy (task-IL masking).
        freeze_norm_stats: keep running statistics fixed instead of re-estimating them.
        autocast: context manager factory for the forward (the trainer's precision).
        reduce: all-reduce-mean of one tensor across ranks (DDP); gradients of the selected
            parameters are averaged before every step and the re-estimated running statistics at
            the end, so replicas stay identical.
        scaler: a fresh ``GradScaler`` for fp16 mixed precision (gradients are reduced before they
            are unscaled, so every rank sees the same overflow decision).
        lr_schedule: ``"constant"``, or ``"cosine"`` (from ``lr`` to 0 over the phase, so the phase
            ends in a low-noise iterate; this library's option, not the paper's).
    """
    if iterations < 1:
        raise ValueError(f"FPF iterations must be >= 1, got {iterations}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    params = list(selection.params.values())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses: list[float] = []
    samples = 0
    with fine_tune_mode(model, selection, freeze_norm_stats):
        for it in range(iterations):
            if lr_schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * it / iterations))
            batch = sample()
            with autocast():
                logits = forward(batch["x"])
                ce_logits = mask(logits, batch["t"]) if mask is not None else None
            loss = fpf_loss(logits, batch["y"], ce_logits, batch.get("logits"), alpha)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the FPF phase's loss is {loss.item()} at iteration {it + 1} of {iterations}: lower the FPF "
                    "learning rate (lr=) or alpha, and check the buffer inputs and the model for non-finite values"
                )
            opt.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if reduce is not None:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                _all_reduce_mean([p.grad for p in params], reduce)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            losses.append(float(loss.detach()))
            samples += int(batch["y"].shape[0])
        opt.zero_grad(set_to_none=True)
        if reduce is not None and not freeze_norm_stats and selection.norm_with_stats:
            stats = [s for m in selection.norm_with_stats.values() for s in (m.running_mean, m.running_var)]
            with torch.no_grad():
                _all_reduce_mean(stats, reduce)
    return PhaseResult(iterations, samples, losses[0], losses[-1], sum(losses) / len(losses))


# ---------------------------------------------------------------------------------------------- compute
def forward_flops_per_sample(model: nn.Module, x: Tensor) -> float:
    """Forward FLOPs of one sample, counted once with ``torch.utils.flop_counter.FlopCounterMode``
    (matmuls and convolutions, 2 FLOPs per multiply-add) on ``x[:1]`` in eval mode without
    gradients; ``2 * num_parameters`` when the counter sees nothing (e.g. unsupported ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x[:1])
        flops = float(counter.get_total_flops())
    finally:
        for m, mode in modes:
            m.training = mode
    if flops <= 0:
        flops = 2.0 * sum(p.numel() for p in model.parameters())
    return flops


@dataclass
class ComputeLedger:
    """Counts k-FPF's extra compute against the training it rides on and against replay.

    Cost model (per sample, ``F`` = forward FLOPs): a normal training step costs ``3F`` (forward,
    and a backward of about twice the forward); an FPF iteration costs at most ``2F`` (a full
    forward and an activation-gradient backward: weight gradients exist only for the few selected
    parameters; with the head alone the backward stops at the head, so ``2F`` is an upper bound);
    every-step experience replay adds a buffer batch of the batch's size, i.e. another ``3F`` per
    training sample. Counts are per rank.
    """

    flops_per_sample: float = 0.0
    train_samples: int = 0
    fpf_phases: int = 0
    fpf_iterations: int = 0
    fpf_samples: int = 0

    def report(self) -> dict[str, float]:
        """FLOPs of training, FPF and the replay it replaces, and FPF's shares of them."""
        f = self.flops_per_sample
        train = 3.0 * f * self.train_samples
        fpf = 2.0 * f * self.fpf_samples
        replay = 3.0 * f * self.train_samples
        return {
            "flops_per_sample": f,
            "train_samples": float(self.train_samples),
            "fpf_phases": float(self.fpf_phases),
            "fpf_iterations": float(self.fpf_iterations),
            "fpf_samples": float(self.fpf_samples),
            "train_flops": train,
            "fpf_flops": fpf,
            "replay_extra_flops": replay,
            "fpf_share": fpf / (train + fpf) if train + fpf > 0 else 0.0,
            "fpf_vs_replay": fpf / replay if replay > 0 else 0.0,
        }

    def state_dict(self) -> dict[str, float]:
        return {"flops_per_sample": self.flops_per_sample, "train_samples": self.train_samples,
                "fpf_phases": self.fpf_phases, "fpf_iterations": self.fpf_iterations,
                "fpf_samples": self.fpf_samples}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.flops_per_sample = float(state["flops_per_sample"])
        for key in ("train_samples", "fpf_phases", "fpf_iterations", "fpf_samples"):
            setattr(self, key, int(state[key]))
