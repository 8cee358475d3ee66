"""PEGO's and LoRAMoE's training steps read no tensor on the host (on a GPU each read waits for the device).

The steps after a warm-up run under :class:`cl_plugins.hostsync.HostSyncCounter`, which records every
``.item()`` / ``bool(t)`` / ``.tolist()`` / ``.cpu()``, boolean-mask indexing, ``nonzero``, ``unique`` and
``torch.equal`` made from this repository's code, by call site. The methods' own code must make none (what
the rest of the step makes, e.g. the classification mixin's loss check, is listed in the failure message).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from callbacks.loramoe import LoRAMoE
from callbacks.pego import PEGO
from callbacks.replay import ExperienceReplay
from cl_plugins.hostsync import HostSyncCounter, SyncWindow
from cl_plugins.models import ContinualClassifier
from cl_plugins.peft.loramoe import LoRAMoEContext, split_experts
from datamodules.digits import SplitDigits
from tests.conftest import quiet_trainer_kwargs

#: the methods' code: no host sync may come from these files
METHOD_FILES = ("cl_plugins/peft/", "callbacks/pego.py", "callbacks/loramoe.py", "callbacks/lora.py",
                "callbacks/injection.py")
WARMUP, STEPS = 2, 4


METHODS = {
    "PEGO": lambda: [PEGO(num_loras=2)],
    "LoRAMoE": lambda: [LoRAMoE(num_experts=4)],
    # replayed samples of the first experience keep their type: resolved per sample from the class
    "LoRAMoE+replay": lambda: [ExperienceReplay(buffer_size=32, replay_batch_size=8), LoRAMoE(num_experts=4)],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_training_steps_make_no_host_sync_in_the_methods_code(method):
    pl.seed_everything(0)
    model = ContinualClassifier("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2),
                                optimizer="adam", lr=1e-3)
    window = SyncWindow(warmup=WARMUP)
    trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[window, *METHODS[method](), window.end],
                                                limit_train_batches=WARMUP + STEPS, limit_val_batches=0))
    trainer.fit(model, datamodule=SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=16))
    assert window.steps == 2 * (WARMUP + STEPS) - WARMUP  # the second experience too (replayed samples)
    ours = {site: n for site, n in window.calls.items() if site.startswith(METHOD_FILES)}
    assert ours == {}, f"host syncs in {method}'s steps: {ours}; all: {dict(window.calls)}"


def test_the_counter_sees_host_reads_in_the_library_by_call_site():
    """The counter is not blind: ``set_types`` reads the types' range (``int`` of ``aminmax``), ``check_types``
    copies it (``tolist``), boolean-mask indexing needs ``nonzero``; a read in the test itself is not counted."""
    ctx = LoRAMoEContext(split_experts(4, 2))
    types = torch.tensor([0, 1, 1])
    with HostSyncCounter() as syncs:
        ctx.set_types(types)
        ctx._watch(types)
        ctx.check_types()
        ctx.coefficients(types)[:, types == 1].sum().item()  # here: not the library's
    sites = {site.split(" ")[0].rsplit(":", 1)[0] + " " + site.split(" ")[1] for site in syncs.calls}
    assert sites == {"cl_plugins/peft/loramoe.py (_raise_on_bad_types)", "cl_plugins/peft/loramoe.py (check_types)"}
    assert syncs.total == 3  # int(lo), int(hi); tolist
