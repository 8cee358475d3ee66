"""Float tolerances that hold on any x86-64 CPU.

A float32 result depends on the order in which its sums are accumulated, and that order differs
between CPUs and settings (AVX2 or AVX-512 kernels, MKL and oneDNN blocking, the number of threads).
The rounding error of a float32 sum is bounded by the magnitude of what was summed, not by the
result: an entry that is a small difference of large terms moves by about ``eps * sum |terms|``
however small it is. A fixed ``atol`` ignores that and fails on another machine (PEGO's gradient
test did: one entry of 512, a difference of terms of size ~90, off by 8.5e-6 against atol 1e-6).

So the tests either compute the reference in float64 and compare with a tolerance from the
magnitude of what the float32 code accumulates, or, where both sides are float32 routes to the same
value, bound their difference the same way:

- :func:`assert_close_accumulated` checks ``|actual - expected| <= ulps * EPS32 * magnitude``
  entrywise, ``magnitude`` being ``sum |terms|`` accumulated into each entry;
- :func:`abs_magnitude` gives that magnitude for a sum of products (matmuls, einsums, ``|.|.sum()``):
  the same expression on the absolute values of its inputs, in float64 (every product is then
  non-negative, so each output entry is exactly the sum of the absolute values of its terms), and
  with ``wrt`` the same for its gradient; :func:`abs_forward` does it for a module (a linear layer
  with its adapters) by running a copy with absolute parameters;
- whole networks (attention, LayerNorm, softmax) have no such simple magnitude: where a test checks
  that two computations of one network agree (merged and unmerged adapters, padded and unpadded
  inputs, ours and PEFT's), both run in float64 and are compared with :data:`FLOAT64_TOL`.

Why ``ulps = 32``: the worst-case bound for a float32 sum of ``n`` terms is ``(n - 1) * eps * sum
|terms|``, but blocked and pairwise accumulation keep the error near a few ``eps * sum |terms|``;
measured on AVX-512, AVX2 and scalar (``ATEN_CPU_CAPABILITY=default``) kernels the errors of these
tests stay below 4 eps of their magnitude. 32 eps (3.8e-6 of the magnitude) leaves a factor 8 and
is still far below a missing term, a wrong factor or a wrong sign, which move an entry by a
sizeable fraction of its magnitude.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

EPS32 = torch.finfo(torch.float32).eps  # 2**-23, about 1.19e-7
EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 2**-7, about 7.8e-3: bf16 keeps 8 significant bits
ULPS = 32.0
#: two float64 computations of a small network's output (sums of at most ~10^3 terms of size <= ~10^2 through
#: a few layers) agree to well below 1e-12 (eps64 = 2.2e-16); 1e-9 leaves a factor 1000 on any CPU and is still
#: 10^4 times below the smallest difference a real bug (a missing adapter, a wrong scale) makes
FLOAT64_TOL = dict(rtol=1e-9, atol=1e-9)


def assert_close_accumulated(actual: Tensor, expected: Tensor, magnitude: Tensor | float, *,
                             ulps: float = ULPS, eps: float = EPS32, msg: str | None = None) -> None:
    """``|actual - expected| <= ulps * eps * magnitude`` entrywise (``magnitude`` broadcasts).

    ``magnitude`` is what the float32 computation accumulated into each entry, ``sum |terms|``
    (see :func:`abs_magnitude`), or one bound for the whole tensor. ``expected`` may be float64.
    ``eps=EPS_BF16`` bounds a bf16 computation (autocast rounds its operands to bf16).
    """
    diff = (actual.detach().double() - expected.detach().double()).abs()
    allowed = ulps * eps * torch.as_tensor(magnitude, dtype=torch.float64).to(diff.device)
    allowed = torch.broadcast_to(allowed, diff.shape)
    bad = ~(diff <= allowed)  # NaN counts as bad
    if bad.any():
        i = int(torch.argmax(torch.where(bad, diff / allowed.clamp_min(1e-300), torch.zeros_like(diff))))
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), diff.shape)) if diff.dim() else ()
        raise AssertionError(
            f"{msg + ': ' if msg else ''}{int(bad.sum())} of {diff.numel()} entries differ by more than "
            f"{ulps:g} x {eps:.3g} x the accumulated magnitude; worst at {idx}: {actual.flatten()[i].item()!r} vs "
            f"{expected.flatten()[i].item()!r}, difference {diff.flatten()[i].item():.3g}, allowed "
            f"{allowed.flatten()[i].item():.3g} (magnitude {allowed.flatten()[i].item() / (ulps * eps):.3g})"
        )


def abs_magnitude(fn: Callable[..., Tensor], *inputs: Tensor,
                  wrt: Sequence[int] = ()) -> Tensor | tuple[Tensor, ...]:
    """``fn`` evaluated on ``|inputs|`` in float64: ``sum |terms|`` of each entry of ``fn(*inputs)``.

    Exact for a sum of products of the inputs (matmuls, einsums, sums, and ``|.|`` of such, which is
    the identity on non-negative values); a bound for the rounding of every intermediate product too.
    With ``wrt`` (input positions) returns the gradients of ``fn(|inputs|).sum()`` with respect to those
    inputs instead: the magnitude of what backpropagation accumulates into each gradient entry.
    """
    absolute = [x.detach().double().abs().requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    with torch.autocast(device_type="cpu", enabled=False):
        out = fn(*absolute)
    if not wrt:
        return out.detach()
    return tuple(g.detach() for g in torch.autograd.grad(out.sum(), [absolute[i] for i in wrt]))


def abs_forward(module: nn.Module, *inputs: Tensor) -> Tensor:
    """``module`` run on ``|inputs|`` with every floating parameter and buffer replaced by its absolute value, in
    float64 and eval mode (a copy; ``module`` is untouched): ``sum |terms|`` of each output entry when the forward
    is a sum of products (linear layers and their unmerged adapters)."""
    twin = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        for t in itertools.chain(twin.parameters(), twin.buffers()):
            if t.is_floating_point():
                t.abs_()
        return twin(*[x.detach().double().abs() for x in inputs])


def merged_weight_magnitude(layer: nn.Module) -> Tensor:
    """``|W0| + s sum_i |B_i| |A_i|`` on the rows a LoRA group layer adapts: what merging adds to its base weight
    and unmerging takes off again, each rounding once."""
    mag = layer.base.weight.detach().double().abs()
    for (s, e), a, b in zip(layer.row_ranges, layer.lora_A, layer.lora_B):
        mag[s:e] += layer.scaling * torch.einsum("onr,nrd->od", b.detach().double().abs(), a.detach().double().abs())
    return mag
