"""The buffer contract between callbacks: who holds a replay buffer, who extends the batch, and who
must hear about forwards on buffer samples.

Callbacks declare capabilities by inheriting small mixins instead of checking each other's types:

- :class:`BufferProvider`: holds a replay buffer that other callbacks may read
  (``ExperienceReplay``, ``DER``/``DERPP``, k-FPF's own buffer). ``extends_batch`` says whether it
  appends buffer samples to the training batch in ``on_train_batch_start`` (ER does; DER replays
  through separate forwards and does not).
- :class:`ReplayForwardListener`: wants to know when a callback runs the model on buffer samples
  inside a training step (DER's replay forwards), e.g. to skip them (k-FPF-KD's logit capture) or to
  describe those samples to the layers (LoRAMoE's sample types).

Helpers: :func:`find_buffer_provider` (readers such as FPF find the buffer to read),
:func:`check_batch_extenders` (at most one callback extends the batch) and
:func:`check_before_batch_extenders` (a callback that must see the original batch comes first), and
:func:`replay_forward`, the context in which a provider runs a forward on buffer samples.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, ClassVar

from torch import Tensor

from cl_plugins.buffers import ReservoirBuffer


class BufferProvider(abc.ABC):
    """A callback that holds a replay buffer other callbacks may read (read only: the provider inserts
    and saves it; a reader draws with its own generator, see ``ReservoirBuffer.sample(generator=)``)."""

    #: appends buffer samples to the training batch in ``on_train_batch_start``
    extends_batch: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def replay_buffer(self) -> ReservoirBuffer | None:
        """The buffer, or ``None`` while this callback holds none (e.g. k-FPF reading another's)."""

    @property
    def stores_logits(self) -> bool:
        """Whether every buffer sample carries the logits stored at its insertion."""
        buffer = self.replay_buffer
        return buffer is not None and buffer.store_logits


class ReplayForwardListener(abc.ABC):
    """A callback that must know when another runs the model on buffer samples in a training step."""

    @abc.abstractmethod
    def replay_forward_context(self, samples: dict[str, Tensor]) -> AbstractContextManager[Any]:
        """Entered around a forward on the buffer ``samples`` (``"x"``, ``"y"``, ``"t"``, ...)."""


def _callbacks(trainer: Any) -> Sequence[Any]:
    return list(getattr(trainer, "callbacks", []) or [])


def buffer_providers(trainer: Any, exclude: Any = None) -> list[BufferProvider]:
    """The trainer's callbacks that hold a buffer now, in callback order (``exclude`` left out)."""
    return [cb for cb in _callbacks(trainer)
            if cb is not exclude and isinstance(cb, BufferProvider) and cb.replay_buffer is not None]


def find_buffer_provider(trainer: Any, reader: Any, needs_logits: bool = False,
                         required: bool = False) -> BufferProvider | None:
    """The one callback whose buffer ``reader`` reads, or ``None`` when there is none (an error when
    ``required``). Raises when several hold one, or when ``needs_logits`` and it stores none."""
    name = type(reader).__name__
    providers = buffer_providers(trainer, exclude=reader)
    if not providers:
        if required:
            raise ValueError(
                f"{name} reads the buffer of another callback and there is none in Trainer(callbacks=[...]): add "
                "ExperienceReplay(...) or DER(...)/DERPP(...), or let it keep a buffer of its own"
            )
        return None
    if len(providers) > 1:
        names = ", ".join(type(p).__name__ for p in providers)
        raise ValueError(
            f"{name} found {len(providers)} callbacks that hold a replay buffer ({names}) and cannot tell whose to "
            "read: keep one of them, or let it keep a buffer of its own"
        )
    provider = providers[0]
    if needs_logits and not provider.stores_logits:
        raise ValueError(
            f"{name} needs the logits stored with each buffer sample, and {type(provider).__name__}'s buffer stores "
            "none: read a buffer that stores logits (DER/DERPP), or let it keep a buffer of its own"
        )
    return provider


def check_batch_extenders(trainer: Any) -> None:
    """Raises when more than one callback appends buffer samples to the batch: the second would insert
    the first's replayed samples into its own buffer and replay them again."""
    extenders = [cb for cb in _callbacks(trainer) if isinstance(cb, BufferProvider) and cb.extends_batch]
    if len(extenders) > 1:
        names = ", ".join(type(cb).__name__ for cb in extenders)
        raise ValueError(
            f"{len(extenders)} callbacks append buffer samples to the training batch ({names}): each would treat "
            "the other's replayed samples as new data and store them. Keep one of them"
        )


def check_before_batch_extenders(trainer: Any, callback: Any, why: str) -> None:
    """Raises when a callback that extends the batch comes before ``callback``, which must see the
    original batch in ``on_train_batch_start`` (``why`` says what for)."""
    name = type(callback).__name__
    for cb in _callbacks(trainer):
        if cb is callback:
            return
        if isinstance(cb, BufferProvider) and cb.extends_batch:
            other = type(cb).__name__
            raise ValueError(
                f"{name} must come before {other} in Trainer(callbacks=[...]): {other} appends buffer samples to "
                f"the batch in on_train_batch_start, and {name} must see the original batch there to {why}. "
                f"Use callbacks=[{name}(...), {other}(...), ...]"
            )


@contextmanager
def replay_forward(trainer: Any, samples: dict[str, Tensor]) -> Iterator[None]:
    """Context of a forward on buffer ``samples`` inside a training step: every
    :class:`ReplayForwardListener` among the trainer's callbacks enters its context around it."""
    with ExitStack() as stack:
        for cb in _callbacks(trainer):
            if isinstance(cb, ReplayForwardListener):
                stack.enter_context(cb.replay_forward_context(samples))
        yield
