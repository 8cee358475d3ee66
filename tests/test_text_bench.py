"""The text benchmark's machinery: seen-only evaluation and the keys-only L2M agreement (against a real fit)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from callbacks.l2m import L2M
from callbacks.metrics import ContinualMetrics
from cl_plugins.models import ContinualClassifier
from datamodules.common import split_benchmark
from datamodules.stream import ContinualDataModule
from examples.bench_peft_text import SeenTestEvaluation, embedding_queries, key_agreement, train_keys
from tests.conftest import quiet_trainer_kwargs

BERT_CFG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _token_benchmark(n: int = 96, length: int = 12, experiences: int = 2):
    """``2 * experiences`` classes of token ids, class c drawing from its own id range; 0-padded."""
    g = torch.Generator().manual_seed(0)
    classes = 2 * experiences

    def make(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(m) % classes
        x = 2 + 4 * y[:, None] + torch.randint(0, 4, (m, length), generator=g)
        lengths = torch.randint(4, length + 1, (m,), generator=g)
        x[torch.arange(length)[None, :] >= lengths[:, None]] = 0
        return x, y

    (tx, ty), (vx, vy) = make(n), make(n)
    return split_benchmark(tx, ty, vx, vy, n_experiences=experiences, class_order=list(range(classes)))


class _SeenOnly(SeenTestEvaluation, ContinualDataModule):
    unseen_samples = 5


class _ValSizes(pl.Callback):
    def __init__(self) -> None:
        self.sizes: list[list[int]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sizes.append([len(dl.dataset) for dl in trainer.val_dataloaders])


def test_seen_only_evaluation_runs_full_test_sets_of_trained_experiences_only():
    pl.seed_everything(0)
    dm = _SeenOnly(benchmark=_token_benchmark(experiences=3), batch_size=16, eval_batch_size=64)
    model = ContinualClassifier("hf-config", num_classes=6, hf_config=BERT_CFG)
    sizes, metrics = _ValSizes(), ContinualMetrics(plot=False, evaluate_initial=False)
    pl.Trainer(**quiet_trainer_kwargs(callbacks=[sizes, metrics], limit_train_batches=2)).fit(model, datamodule=dm)
    full = [len(dm.test_dataset(j)) for j in range(3)]
    assert sizes.sizes == [[full[0], 5, 5], [full[0], full[1], 5], full]
    assert len(metrics.matrix) == 3 and metrics.summary()["avg_forgetting"] is not None


class _InitialKeys(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.keys = pl_module.l2m_pool.keys.detach().clone()


def test_keys_only_training_reproduces_the_callbacks_keys_and_counts():
    """The benchmark's --l2m-keys-only mode claims to be the callback's key learning exactly: the same batches
    (the stream's order), count penalty, selection and key update, so the same keys and histograms."""
    pl.seed_everything(0)
    dm = ContinualDataModule(benchmark=_token_benchmark(experiences=2), batch_size=16, seed=3)
    model = ContinualClassifier("hf-config", num_classes=4, hf_config=BERT_CFG, optimizer="adam", lr=1e-3)
    l2m, initial = L2M(pool_size=6), _InitialKeys()
    pl.Trainer(**quiet_trainer_kwargs(callbacks=[l2m, initial], limit_val_batches=0)).fit(model, datamodule=dm)

    def rows(e: int) -> torch.Tensor:
        data = dm.train_dataset(e)
        return torch.stack([torch.as_tensor(data[i][0]) for i in range(len(data))])

    train_q = [embedding_queries(model, rows(e)) for e in range(2)]
    pool, counts = train_keys(train_q, "mean", seed=3, batch_size=16, epochs=1, lr=0.0, pool_size=6,
                              init=initial.keys)
    assert [c.tolist() for c in counts] == [l2m.key_histograms[0], l2m.key_histograms[1]]
    # unit vectors from sums of at most 48 unit vectors: float32 rounding only
    torch.testing.assert_close(pool.keys, model.l2m_pool.keys, rtol=0, atol=1e-5)
    test_q = [q[:10] for q in train_q]
    agreement = key_agreement(pool, counts, test_q)
    assert len(agreement) == 2 and all(0.0 <= a <= 1.0 for a in agreement)


def _args(**overrides):
    import argparse

    base = dict(scenario="task", replay_buffer=0, train_per_task=2000, test_per_task=1000, max_length=64,
                batch_size=16, epochs=1, subset_seed=0, lr_full=5e-5, lr_adapter=1e-3)
    return argparse.Namespace(**{**base, **overrides})


def test_saved_runs_aggregate_by_method_across_files_with_key_matches_restored(tmp_path):
    """``--jsonl`` runs from separate invocations (one seed each) load back grouped by method, in file order."""
    from examples.bench_peft_text import load_runs, save_run

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    save_run(str(a), "LoRA", "LoRA", 0, _args(), {"avg_acc": 0.5, "matrix": torch.eye(2)})
    save_run(str(a), "L2M", "L2M", 0, _args(), {"avg_acc": 0.6, "l2m_key_match": {0: 0.9, 1: 0.8}})
    save_run(str(b), "LoRA", "LoRA", 1, _args(), {"avg_acc": 0.7, "matrix": [[1.0]]}, code="abc1234")
    results, settings, seeds, threads = load_runs([str(a), str(b)], None, None)
    assert results["LoRA"][1]["code"] == "abc1234"  # the revision the process started with, not the one at saving
    assert list(results) == ["LoRA", "L2M"]
    assert [r["avg_acc"] for r in results["LoRA"]] == [0.5, 0.7]
    assert results["LoRA"][0]["matrix"] == [[1.0, 0.0], [0.0, 1.0]]  # tensors are stored as lists
    assert results["L2M"][0]["l2m_key_match"] == {0: 0.9, 1: 0.8}  # int keys again, not JSON's strings
    assert settings["test_per_task"] == 1000 and seeds == [0, 1] and threads == {torch.get_num_threads()}
    only, _, seeds, _ = load_runs([str(a), str(b)], ["LoRA"], [1])
    assert list(only) == ["LoRA"] and len(only["LoRA"]) == 1 and seeds == [1]


def test_aggregate_refuses_mixed_settings_and_a_seed_run_twice(tmp_path):
    import pytest

    from examples.bench_peft_text import load_runs, save_run

    mixed, twice = tmp_path / "mixed.jsonl", tmp_path / "twice.jsonl"
    save_run(str(mixed), "LoRA", "LoRA", 0, _args(), {"avg_acc": 0.5})
    save_run(str(mixed), "LoRA", "LoRA", 1, _args(test_per_task=200), {"avg_acc": 0.5})
    with pytest.raises(SystemExit, match="ran with .* other runs with"):
        load_runs([str(mixed)], None, None)
    assert len(load_runs([str(mixed)], None, [1])[0]["LoRA"]) == 1  # filtered to one setting: fine
    save_run(str(twice), "LoRA", "LoRA", 0, _args(), {"avg_acc": 0.5})
    save_run(str(twice), "LoRA", "LoRA", 0, _args(), {"avg_acc": 0.6})
    with pytest.raises(SystemExit, match="appears twice"):
        load_runs([str(twice)], None, None)
    with pytest.raises(SystemExit, match="no run"):
        load_runs([str(twice)], ["PEGO"], None)


def test_targets_pair_each_run_with_full_fine_tuning_of_the_same_seed():
    from examples.bench_peft_text import paired_difference, seeds_holding

    full = [{"seed": 0, "avg_acc": 0.50}, {"seed": 1, "avg_acc": 0.60}, {"seed": 2, "avg_acc": 0.70}]
    method = [{"seed": 2, "avg_acc": 0.72}, {"seed": 0, "avg_acc": 0.49}, {"seed": 1, "avg_acc": 0.66}]
    assert seeds_holding(method, full, lambda r, f: r["avg_acc"] >= f["avg_acc"]) == "2/3 seeds"
    # paired by seed (not by position): +2, -1, +6 points -> mean +2.3, std 3.5
    assert paired_difference(method, full) == "paired difference +2.3 ± 3.5 points"
    assert paired_difference(method[:1], full) == "paired difference +2.0 points"
    assert paired_difference([{"seed": 9, "avg_acc": 0.1}], full) == "no common seed"


def test_learning_split_sums_to_the_average_accuracy_and_pairs_by_seed():
    """Average accuracy = learning accuracy (diagonal) + (T-1)/T * BWT, by hand on a 3-task matrix; the report
    splits each method's paired difference to full fine-tuning of the same seed into those two parts."""
    from examples.bench_peft_text import learning_report, learning_split

    m = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.0], [0.5, 0.7, 0.6]]
    learnt, lost = learning_split(m)
    assert abs(learnt - (0.9 + 0.8 + 0.6) / 3) < 1e-12
    # BWT = ((0.5 - 0.9) + (0.7 - 0.8)) / 2 = -0.25; times 2/3
    assert abs(lost - (-0.25 * 2 / 3)) < 1e-12
    assert abs(learnt + lost - sum(m[-1]) / 3) < 1e-12
    assert learning_split([[0.3, 0.0, 0.0], *m]) == (learnt, lost)  # an initial row is ignored
    full = [{"seed": 1, "matrix": [[0.9, 0.0], [0.7, 0.9]]}, {"seed": 0, "matrix": [[0.8, 0.0], [0.8, 0.8]]}]
    # seed 0: learning acc 0.75 vs 0.80, (T-1)/T * BWT 0 vs 0 -> -5 = (-5, 0) points; seed 1: 0.85 vs 0.90,
    # 0.5 * (0.5 - 0.8) vs 0.5 * (0.7 - 0.9) -> -10 = (-5, -5); the method's runs are paired by seed, not order
    method = [{"seed": 0, "matrix": [[0.7, 0.0], [0.7, 0.8]]}, {"seed": 1, "matrix": [[0.8, 0.0], [0.5, 0.9]]}]
    table = learning_report({"full fine-tuning": full, "LoRA": method}, str, ["a", "b"])
    row = next(line for line in table.splitlines() if line.startswith("| LoRA"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["2", "75.0 ± 7.1", "85.0 ± 7.1", "80.0 ± 7.1", "-7.5 ± 3.5", "-5.0 ± 0.0", "-2.5 ± 3.5"]


def test_pool_joins_a_summary_with_new_values_as_if_all_were_at_hand():
    import math
    import statistics

    import pytest

    from examples.bench_peft_text import pool

    values = [58.1, 61.3, 55.0, 49.7, 63.2]  # float64 throughout: exact up to rounding of a few terms
    n, m, s = pool(3, statistics.mean(values[:3]), statistics.stdev(values[:3]), values[3:])
    assert n == 5 and math.isclose(m, statistics.mean(values), abs_tol=1e-12)
    assert math.isclose(s, statistics.stdev(values), rel_tol=1e-12)
    assert pool(0, 0.0, 0.0, [1.0, 3.0]) == (2, 2.0, math.sqrt(2.0))  # no summary: the values' own statistics
    assert pool(2, 5.0, 1.0, []) == (2, 5.0, 1.0)  # nothing new: the summary itself
    with pytest.raises(ValueError, match="nothing to pool"):
        pool(0, 0.0, 0.0, [])


def _prior(**methods):
    return {"source": "test", "settings": vars(_args()), "seeds": [0, 1, 2], "methods": methods}


def test_pooled_targets_count_the_summary_seeds_and_the_saved_ones(tmp_path):
    """Full FT forgets 12% on the summary's three seeds and 10% and 14% on the saved two: the pooled bound is
    half of 12%; the method's counts add the summary's holding seeds to the saved seeds that hold."""
    import json

    from examples.bench_peft_text import load_prior, load_runs, pooled_report, save_run

    path = tmp_path / "runs.jsonl"
    for seed, (fa, ff) in {3: (0.60, 0.10), 4: (0.56, 0.14)}.items():
        save_run(str(path), "full fine-tuning", "full fine-tuning", seed, _args(),
                 {"avg_acc": fa, "avg_forgetting": ff, "bwt": -ff})
    for seed, (a, f) in {3: (0.61, 0.04), 4: (0.55, 0.075)}.items():  # seed 3 holds both, seed 4 neither
        save_run(str(path), "PEGO", "PEGO", seed, _args(), {"avg_acc": a, "avg_forgetting": f, "bwt": -f})
    results, settings, seeds, _ = load_runs([str(path)], None, None)
    assert {r["code"] for rs in results.values() for r in rs} != {"not recorded"}  # the code revision is saved
    summary = _prior(**{"full fine-tuning": {"avg_acc": [58.0, 2.0], "avg_forgetting": [12.0, 3.0],
                                             "bwt": [-12.0, 3.0]},
                        "PEGO": {"avg_acc": [59.0, 1.0], "avg_forgetting": [6.0, 1.0], "bwt": [-6.0, 1.0],
                                 "held_forgetting": 2, "held_accuracy": 1, "acc_difference": [1.0, 2.0]},
                        # on the summary's seeds only: compared with full FT on those seeds alone
                        "L2M": {"avg_acc": [57.0, 1.0], "avg_forgetting": [5.0, 1.0], "bwt": [-5.0, 1.0],
                                "held_forgetting": 3, "held_accuracy": 0, "acc_difference": [-1.0, 1.0],
                                "l2m_key_match": [[90.0, 1.0], [95.0, 0.5]]}})
    prior_file = tmp_path / "prior.json"
    prior_file.write_text(json.dumps(summary))
    report = pooled_report(load_prior(str(prior_file), settings, seeds), results, str)
    # full FT forgetting: (3 * 12 + 10 + 14) / 5 = 12.0; PEGO: (3 * 6 + 4 + 7.5) / 5 = 5.9 <= 6.0
    assert "| PEGO | 5 | 58.6 ± " in report
    assert "forgetting 5.9% vs half of full FT's 6.0%: met (3/5 seeds)" in report
    # accuracy: PEGO (177 + 61 + 55) / 5 = 58.6 vs full FT (174 + 60 + 56) / 5 = 58.0
    assert "accuracy 58.6% vs full FT's 58.0%: met (2/5 seeds, paired difference +0.6 ±" in report
    assert ("- L2M: forgetting 5.0% vs half of full FT's 6.0%: met (3/3 seeds); accuracy 57.0% vs full FT's 58.0%: "
            "NOT met (0/3 seeds, paired difference -1.0 ± 1.0 points)") in report
    assert "| L2M | 90.0 ± 1.0 | 95.0 ± 0.5 |" in report  # the summary's key agreement with no new run
    with pytest_raises_system_exit("differ from the saved runs"):
        load_prior(str(prior_file), {**settings, "test_per_task": 200}, seeds)
    with pytest_raises_system_exit("both in the summary and in the saved runs"):
        load_prior(str(prior_file), settings, [2, 3])


def pytest_raises_system_exit(match: str):
    import pytest

    return pytest.raises(SystemExit, match=match)
