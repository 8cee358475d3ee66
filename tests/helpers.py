"""Small callbacks shared by the tests."""

from __future__ import annotations

from callbacks import ContinualCallback


class StopAfter(ContinualCallback):
    """Stops the fit at the end of one experience, as a crash or a time limit would."""

    def __init__(self, experience: int) -> None:
        super().__init__()
        self.experience = experience

    def on_experience_end(self, trainer, pl_module, experience):
        if experience == self.experience:
            trainer.should_stop = True
