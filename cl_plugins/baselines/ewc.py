"""Online EWC (Schwarz et al., "Progress & Compress", ICML 2018) as in Mammoth's ``models/ewc_on.py``.

After each experience the diagonal of an empirical Fisher information matrix is estimated over the
experience's training data and folded into a running estimate, ``F <- gamma * F + F_new``; the
parameters at that moment become the anchor ``theta*``. Training then adds
``e_lambda * sum_k F_k (theta_k - theta*_k)^2`` (:func:`cl_plugins.baselines.quadratic.quadratic_penalty`).

Two estimators of ``F_new``:

- :func:`fisher_per_sample` (``"per_sample"``, Mammoth's): for every training sample ``(x, y)``,
  ``p(y|x) * (d log p(y|x) / d theta)^2``, averaged over the samples. The weight ``p(y|x)``
  is Mammoth's (``exp_cond_prob``); the per-sample gradients are exact whichever way they are
  computed (one batched backward for ``nn.Linear`` layers, ``torch.func.vmap``, or one backward per
  sample as Mammoth).
- :func:`fisher_batch` (``"batch"``, Avalanche's ``EWCPlugin``): the squared gradient of the
  mean cross-entropy of each batch, averaged over the batches.

Everything is computed in float32 (autocast off); see ``docs/methods/ewc.md`` for the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FisherMode = Literal["per_sample", "batch"]
PerSampleMethod = Literal["auto", "linear", "vmap", "loop"]


def check_ewc_hparams(e_lambda: float, gamma: float) -> None:
    """Raises a ``ValueError`` for a negative ``e_lambda`` or a ``gamma`` outside ``(0, 1]``."""
    if not e_lambda >= 0:
        raise ValueError(f"e_lambda (the EWC penalty weight) must be >= 0, got {e_lambda}")
    if not 0 < gamma <= 1:
        raise ValueError(
            f"gamma (online EWC's decay of the old Fisher) must be in (0, 1], got {gamma}: 1 keeps every "
            "experience's Fisher at full weight (Mammoth's best args), smaller values forget older ones"
        )


def _masked_log_probs(logits: Tensor, keep: Tensor | None) -> Tensor:
    logits = logits.float()
    if keep is not None:
        logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return torch.log_softmax(logits, dim=-1)


def _zeros_like(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}


def fisher_per_sample(
    model: Callable[[Tensor], Tensor] | nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    keep: Tensor | None = None,
    method: PerSampleMethod = "auto",
) -> dict[str, Tensor]:
    """Sum over the samples of ``p(y|x) * (d log p(y|x) / d theta)^2`` (not yet divided by their number).

    Args:
        model: maps a batch of inputs to logits ``(B, C)``; an ``nn.Module`` whose named parameters
            include ``params`` for every method but ``"loop"``. Samples must not interact (eval mode).
        params: the parameters to differentiate, by their names in ``model``.
        inputs, targets: one batch.
        keep: optional ``(B, C)`` boolean mask of the outputs each sample's softmax covers (task-IL
            masking as in training); masked outputs get no probability.
        method: how the per-sample gradients are obtained, all exact:
            ``"linear"``: one batched backward; for ``nn.Linear`` weights and biases the sum of squared
            per-sample gradients is ``(w * g^2)^T a^2`` from each layer's input ``a`` and output gradient
            ``g`` (every parameter must belong to an ``nn.Linear`` called once per forward on ``(B, in)``);
            ``"vmap"``: ``torch.func`` per-sample gradients; ``"loop"``: one backward per sample, as Mammoth;
            ``"auto"``: ``"linear"`` where it applies, else ``"vmap"``.
    """
    if targets.dim() != 1 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"targets must be (batch,) class indices matching inputs, got {tuple(targets.shape)}")
    if method not in ("auto", "linear", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'linear', 'vmap' or 'loop', got {method!r}")
    if method in ("auto", "linear"):
        owners = _linear_owners(model, params)
        if owners is not None:
            out = _fisher_per_sample_linear(model, params, owners, inputs, targets, keep)
            if out is not None:
                return out
        if method == "linear":
            raise ValueError(
                "method='linear' needs every regularized parameter to be the weight or bias of an nn.Linear that "
                "the forward calls once on (batch, features) inputs; use method='vmap' or 'loop' for this model"
            )
        method = "vmap"
    if method == "vmap":
        return _fisher_per_sample_vmap(model, params, inputs, targets, keep)
    total = _zeros_like(params)
    names, tensors = list(params), list(params.values())
    for i in range(inputs.shape[0]):
        with torch.enable_grad():
            log_probs = _masked_log_probs(model(inputs[i:i + 1]), None if keep is None else keep[i:i + 1])
            log_p = log_probs[0, targets[i]]
            grads = torch.autograd.grad(log_p, tensors, allow_unused=True)
        weight = log_p.detach().exp()
        for n, g in zip(names, grads):
            if g is not None:
                total[n] += weight * g.float().pow(2)
    return total


def _linear_owners(model: Callable[[Tensor], Tensor] | nn.Module, params: Mapping[str, Tensor]
                   ) -> dict[str, tuple[nn.Linear, str]] | None:
    """``name -> (nn.Linear, "weight" | "bias")`` when every parameter belongs to an ``nn.Linear``, else ``None``."""
    if not isinstance(model, nn.Module):
        return None
    modules = dict(model.named_modules())
    owners = {}
    for name, p in params.items():
        module_name, _, attr = name.rpartition(".")
        module = modules.get(module_name)
        if not isinstance(module, nn.Linear) or attr not in ("weight", "bias") or getattr(module, attr) is not p:
            return None
        owners[name] = (module, attr)
    return owners


def _fisher_per_sample_linear(
    model: nn.Module,
    params: Mapping[str, Tensor],
    owners: Mapping[str, tuple[nn.Linear, str]],
    inputs: Tensor,
    targets: Tensor,
    keep: Tensor | None,
) -> dict[str, Tensor] | None:
    """The ``"linear"`` method; ``None`` when a layer did not run exactly once on ``(B, in)`` inputs."""
    layers = {id(m): m for m, _ in owners.values()}
    seen: dict[int, list[tuple[Tensor, Tensor]]] = {k: [] for k in layers}

    def capture(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        seen[id(module)].append((args[0], output))

    handles = [m.register_forward_hook(capture) for m in layers.values()]
    try:
        with torch.enable_grad():
            log_p = _masked_log_probs(model(inputs), keep).gather(1, targets.unsqueeze(1)).squeeze(1)
            if not all(len(v) == 1 and v[0][0].dim() == 2 and v[0][1].requires_grad for v in seen.values()):
                return None
            keys = list(seen)
            grads = torch.autograd.grad(log_p.sum(), [seen[k][0][1] for k in keys])
    finally:
        for h in handles:
            h.remove()
    out_grad = dict(zip(keys, grads))
    weight = log_p.detach().exp().unsqueeze(1)
    out = {}
    for name, (module, attr) in owners.items():
        a = seen[id(module)][0][0]
        wg2 = weight * out_grad[id(module)].float().pow(2)  # (B, out): each sample's squared output gradient
        out[name] = wg2.T @ a.detach().float().pow(2) if attr == "weight" else wg2.sum(0)
    return out


def _fisher_per_sample_vmap(
    model: Callable[[Tensor], Tensor] | nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    keep: Tensor | None,
) -> dict[str, Tensor]:
    from torch.func import functional_call, grad_and_value, vmap

    if not isinstance(model, nn.Module):
        raise TypeError("the vectorized per-sample Fisher needs an nn.Module (or pass method='loop')")
    detached = {n: p.detach() for n, p in params.items()}

    def log_p(p: dict[str, Tensor], x: Tensor, y: Tensor, k: Tensor | None) -> Tensor:
        logits = functional_call(model, p, (x.unsqueeze(0),))
        return _masked_log_probs(logits, None if k is None else k.unsqueeze(0))[0].gather(0, y.unsqueeze(0))[0]

    per_sample = vmap(grad_and_value(log_p), in_dims=(None, 0, 0, None if keep is None else 0))
    try:
        with torch.no_grad():  # torch.func.grad ignores it; other parameters build no graph
            grads, values = per_sample(detached, inputs, targets, keep)
    except RuntimeError as err:
        raise RuntimeError(
            f"the vectorized per-sample Fisher failed ({err}); the model's forward is not vmap-compatible: "
            "pass fisher_method='loop' (one backward per sample, as Mammoth) or fisher='batch'"
        ) from err
    weight = values.detach().exp()
    out = {}
    for n, g in grads.items():
        w = weight.view(-1, *([1] * (g.dim() - 1)))
        out[n] = (w * g.float().pow(2)).sum(0)
    return out


def fisher_batch(
    model: Callable[[Tensor], Tensor],
    params: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    keep: Tensor | None = None,
) -> dict[str, Tensor]:
    """``(d CE_mean / d theta)^2`` of one batch (Avalanche's ``EWCPlugin``), float32."""
    names, tensors = list(params), list(params.values())
    with torch.enable_grad():
        loss = F.nll_loss(_masked_log_probs(model(inputs), keep), targets)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return {n: (torch.zeros_like(p, dtype=torch.float32) if g is None else g.float().pow(2))
            for n, p, g in zip(names, tensors, grads)}


def empirical_fisher(
    model: Callable[[Tensor], Tensor] | nn.Module,
    params: Mapping[str, Tensor],
    batches: Iterable[tuple[Tensor, Tensor, Tensor | None]],
    mode: FisherMode = "per_sample",
    method: PerSampleMethod = "auto",
) -> tuple[dict[str, Tensor], int]:
    """Sums the Fisher terms of ``batches`` of ``(inputs, targets, keep)``.

    Returns ``(sums, count)``: divide by ``count`` (samples for ``"per_sample"``, batches for
    ``"batch"``) after summing ``sums`` and ``count`` over processes.
    """
    if mode not in ("per_sample", "batch"):
        raise ValueError(f"fisher must be 'per_sample' (Mammoth) or 'batch' (Avalanche), got {mode!r}")
    total = _zeros_like(params)
    count = 0
    with torch.autocast(device_type=next(iter(params.values())).device.type, enabled=False):
        for x, y, keep in batches:
            if mode == "per_sample":
                part = fisher_per_sample(model, params, x, y, keep, method=method)
                count += int(y.shape[0])
            else:
                part = fisher_batch(model, params, x, y, keep)
                count += 1
            for n in total:
                total[n] += part[n]
    return total, count


def online_fisher(previous: Mapping[str, Tensor] | None, new: Mapping[str, Tensor], gamma: float) -> dict[str, Tensor]:
    """``gamma * previous + new`` (just ``new`` at the first experience), Mammoth's online update."""
    if previous is None:
        return {n: t.clone() for n, t in new.items()}
    if previous.keys() != new.keys():
        raise KeyError("the stored Fisher and the new one cover different parameters")
    return {n: gamma * previous[n] + new[n] for n in new}
