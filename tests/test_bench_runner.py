"""The benchmark runner (examples/bench_runner.py) and the Avalanche side (examples/peers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cl_plugins import ContinualClassifier
from datamodules import SplitDigits
from examples.bench_runner import BenchConfigError, check_config, main, replace_block, substitute, table
from examples.peers import accuracy_row, check_peer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "configs" / "smoke.yaml"


def _cfg(**methods):
    return {
        "seeds": [0],
        "streams": {"s": {"datamodule": {"class_path": "datamodules.SplitDigits"}, "params": {"buffer_size": 10}}},
        "methods": methods or {"naive": {}},
    }


def test_smoke_config_runs_ours_and_avalanche_and_writes_one_table(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nbefore\n")
    results = main([str(SMOKE), "--output-dir", str(tmp_path / "out"), "--markdown", str(md), "--no-progress"])

    assert [r["method"] for r in results] == ["naive", "ER", "Avalanche Naive", "Avalanche Replay"]
    mlp = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8))
    for r in results:
        run_dir = tmp_path / "out" / "smoke" / "Split-Digits" / r["method"].replace(" ", "_") / "seed0"
        assert (run_dir / "accuracy_matrix.png").stat().st_size > 0
        assert len(json.loads((run_dir / "metrics.json").read_text())["matrix"]) == 5
        assert (run_dir / "run.log").exists()
        assert len(r["matrix"]) == 5 and all(len(row) == 5 for row in r["matrix"])
        assert r["peak_mem_mib"] is not None and r["peak_mem_mib"] >= 0  # forked child, Linux
        assert r["trainable_params"] == sum(p.numel() for p in mlp.parameters())
    by = {r["method"]: r for r in results}
    # a replay buffer keeps earlier experiences alive in Avalanche's loop as in ours
    assert by["Avalanche Replay"]["avg_forgetting"] < by["Avalanche Naive"]["avg_forgetting"]
    assert by["ER"]["avg_forgetting"] < by["naive"]["avg_forgetting"]
    # class-IL evaluation masks unseen classes: nothing is right on experiences not trained yet
    for r in results:
        assert all(r["matrix"][i][j] == 0.0 for i in range(5) for j in range(i + 1, 5))

    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n")
    assert text.count("<!-- bench_runner:smoke:begin -->") == 1
    rows = [line for line in text.splitlines() if line.startswith("| Split-Digits |")]
    assert len(rows) == 4 and "1.00x" in rows[0]


def test_replace_block_is_idempotent_and_keeps_the_rest(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("head\n")
    replace_block(md, "x", "first", "Title")
    replace_block(md, "y", "other", "Other")
    replace_block(md, "x", "second", "Title")
    text = md.read_text()
    assert text.count("## Title") == 1 and "first" not in text and "second" in text
    assert text.startswith("head\n") and "other" in text
    assert text.index("second") < text.index("other")  # replaced in place


def test_params_are_substituted_and_a_missing_one_is_named():
    assert substitute({"a": ["@buffer_size", 3]}, {"buffer_size": 7}, "w") == {"a": [7, 3]}
    with pytest.raises(BenchConfigError, match="params.bank.*buffer_size"):
        substitute({"a": "@bank"}, {"buffer_size": 7}, "w")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(extra=1), "unknown key"),
        (lambda c: c.update(seeds=[]), "seeds"),
        (lambda c: c["methods"].update(m={"avalanche": "Replay", "callbacks": []}), "both"),
        (lambda c: c["methods"].update(m={"avalanche": "Nope"}), "unknown Avalanche strategy"),
        (lambda c: c["methods"].update(m={"callbacks": [{"init_args": {}}]}), "class_path"),
        (lambda c: c["methods"].update(m={"avalanche": "Replay", "args": {"mem_size": "@memory"}}), "params.memory"),
        (lambda c: c["streams"]["s"].update(methods=["nope"]), "unknown method"),
        (lambda c: c["streams"]["s"].pop("datamodule"), "datamodule.class_path"),
    ],
)
def test_config_mistakes_fail_before_any_run(change, message):
    cfg = _cfg()
    change(cfg)
    with pytest.raises(BenchConfigError, match=message):
        check_config(cfg)


def test_peers_refuse_task_incremental_streams():
    with pytest.raises(ValueError, match="scenario 'class'"):
        check_peer("Replay", SplitDigits(n_experiences=5, scenario="task"))
    with pytest.raises(ValueError, match="unknown Avalanche strategy"):
        check_peer("Nope", SplitDigits(n_experiences=5))


class _Constant(nn.Module):
    """Logit c for class c: the highest unmasked class always wins."""

    def forward(self, x):
        return torch.arange(10.0).expand(len(x), 10)


def test_peer_evaluation_masks_the_classes_not_yet_trained():
    dm = SplitDigits(n_experiences=5)
    _ = dm.benchmark
    labels = [torch.tensor([int(dm.test_dataset(j)[i][1]) for i in range(len(dm.test_dataset(j)))])
              for j in range(5)]
    for trained in (0, 2, 4):
        top = max(c for i in range(trained + 1) for c in dm.classes_in_experience[i])
        expected = [float((y == top).float().mean()) for y in labels]
        assert accuracy_row(_Constant(), dm, trained) == pytest.approx(expected)


def _smoke_copy(tmp_path: Path, edit) -> Path:
    import yaml

    cfg = yaml.safe_load(SMOKE.read_text())
    edit(cfg)
    path = tmp_path / "smoke.yaml"  # same stem: same output folder and markdown block as the original
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_reuse_takes_unchanged_runs_and_reruns_changed_ones(tmp_path):
    out = str(tmp_path / "out")
    common = ["--output-dir", out, "--no-progress", "--in-process"]
    first = main([str(SMOKE), "--methods", "naive", "ER", *common])
    by_first = {r["method"]: r for r in first}

    # all four methods, two of them done already: those two are taken as they were (same wall time to the
    # last digit), the Avalanche ones run
    second = main([str(SMOKE), "--reuse", *common])
    assert [r["method"] for r in second] == ["naive", "ER", "Avalanche Naive", "Avalanche Replay"]
    assert second[0] == by_first["naive"] and second[1] == by_first["ER"]

    # a changed setting (ER's buffer) reruns exactly the runs it defines; the rest is reused again
    changed = _smoke_copy(tmp_path, lambda c: c["streams"]["Split-Digits"]["params"].update(buffer_size=50))
    third = main([str(changed), "--reuse", *common])
    by_third = {r["method"]: r for r in third}
    assert by_third["naive"] == second[0] and by_third["Avalanche Naive"] == second[2]
    assert by_third["ER"]["fingerprint"] != by_first["ER"]["fingerprint"]
    assert by_third["ER"]["wall_s"] != by_first["ER"]["wall_s"]
    assert by_third["Avalanche Replay"]["fingerprint"] != second[3]["fingerprint"]

    # a partial run with --reuse keeps the other runs' records in results.json
    main([str(changed), "--reuse", "--methods", "naive", *common])
    saved = json.loads((Path(out) / "smoke" / "results.json").read_text())
    assert sorted(r["method"] for r in saved) == sorted(by_third)


def test_a_method_overrides_the_streams_model_settings(tmp_path):
    def edit(cfg):
        cfg["methods"] = {"naive": {}, "wide": {"model": {"backbone_kwargs": {"hidden": 32}}}}

    results = main([str(_smoke_copy(tmp_path, edit)), "--output-dir", str(tmp_path / "out"), "--no-progress",
                    "--in-process"])
    by = {r["method"]: r for r in results}
    narrow = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8))
    wide = ContinualClassifier("mlp", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"hidden": 32})
    assert by["naive"]["trainable_params"] == sum(p.numel() for p in narrow.parameters())
    assert by["wide"]["trainable_params"] == sum(p.numel() for p in wide.parameters())
    assert by["wide"]["trainable_params"] != by["naive"]["trainable_params"]

    cfg = _cfg(m={"model": "lr=0.1"})
    with pytest.raises(BenchConfigError, match="'model' must map"):
        check_config(cfg)


def test_reuse_reruns_when_the_code_changed(tmp_path, monkeypatch):
    """A result measured with other code is not reused, whatever the config says."""
    import examples.bench_runner as runner

    out = str(tmp_path / "out")
    common = ["--output-dir", out, "--no-progress", "--in-process", "--methods", "naive"]
    first = main([str(SMOKE), *common])
    again = main([str(SMOKE), "--reuse", *common])
    assert again[0] == first[0]  # same code: reused, wall time to the last digit
    monkeypatch.setattr(runner, "code_fingerprint", lambda: "edited-code")
    third = main([str(SMOKE), "--reuse", *common])
    assert third[0]["fingerprint"] != first[0]["fingerprint"] and third[0]["wall_s"] != first[0]["wall_s"]


def test_code_fingerprint_follows_the_library_files(tmp_path, monkeypatch):
    import examples.bench_runner as runner

    for pkg in runner.CODE_PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "a.py").write_text("x = 1\n")
    for f in runner.CODE_FILES:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    monkeypatch.setattr(runner, "_ROOT", tmp_path)
    runner.code_fingerprint.cache_clear()
    before = runner.code_fingerprint()
    runner.code_fingerprint.cache_clear()
    (tmp_path / "callbacks" / "a.py").write_text("x = 2\n")
    after = runner.code_fingerprint()
    runner.code_fingerprint.cache_clear()
    assert before != after


def test_published_figures_sit_beside_ours_with_the_two_std_rule():
    cfg = _cfg(m={})
    cfg["published"] = {"source": "a paper", "results": {"s": {"m": {"avg_acc": [50.0, 2.0]}}}}
    check_config(cfg)
    results = [{"stream": "s", "method": "m", "seed": i, "avg_acc": a, "avg_forgetting": 0.1, "bwt": -0.1,
                "wall_s": 1.0, "peak_mem_mib": None, "trainable_params": 10} for i, a in enumerate((0.52, 0.54))]
    text = table(results, cfg)
    assert "published avg acc (%)" in text and "50.00 ± 2.00" in text and "yes (+3.0)" in text
    results[1]["avg_acc"] = 0.60  # mean 56: 6 points above, more than 2 std
    assert "no (+6.0)" in table(results, cfg)
    for bad, msg in (({"results": {"x": {}}}, "unknown stream"), ({"results": {"s": {"z": {}}}}, "unknown method"),
                     ({"results": {"s": {"m": {"acc": 1}}}}, "unknown key"),
                     ({"results": {"s": {"m": {"avg_acc": "high"}}}}, "mean, std")):
        cfg["published"] = bad
        with pytest.raises(BenchConfigError, match=msg):
            check_config(cfg)


def test_a_published_mean_without_std_shows_the_difference_only_and_task_il_sits_beside_it():
    cfg = _cfg(m={})
    cfg["published"] = {"source": "a README", "results": {"s": {"m": {"avg_acc": 50.0, "task_il_avg_acc": [90.0]}}}}
    check_config(cfg)
    results = [{"stream": "s", "method": "m", "seed": i, "avg_acc": a, "task_il_avg_acc": t, "avg_forgetting": 0.1,
                "bwt": -0.1, "wall_s": 1.0, "peak_mem_mib": None, "trainable_params": 10}
               for i, (a, t) in enumerate(((0.52, 0.95), (0.54, 0.97)))]
    text = table(results, cfg)
    assert "published task-IL acc (%)" in text and "| 50.00 |" in text and "| 90.00 |" in text
    assert "std n/a (+3.0)" in text and "std n/a (+6.0)" in text and "yes" not in text


def test_a_methods_trainer_entries_override_the_streams(monkeypatch, tmp_path):
    import examples.bench_runner as runner

    cfg = _cfg(m={"trainer": {"gradient_clip_val": 1.0}})
    check_config(cfg)
    seen = {}

    def fake_run_stream(model, dm, callbacks, output_dir=None, **kw):
        seen.update(kw)
        return {"avg_acc": 0.5, "avg_forgetting": None, "bwt": None, "fwt": None, "wall_s": 0.0, "matrix": [[0.5]]}

    monkeypatch.setattr(runner, "run_stream", fake_run_stream)
    runner.run_one(cfg, "s", "m", 0, tmp_path, measure_memory=False)
    assert seen["gradient_clip_val"] == 1.0
    cfg["methods"]["m"]["trainer"] = [1]
    with pytest.raises(BenchConfigError, match="'trainer' must map"):
        check_config(cfg)


BENCH_CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_bench_config_builds_its_streams_models_and_callbacks(path: Path) -> None:
    """Each table's config is checked, and every stream's datamodule, every (stream, method) model and every
    callback is constructed from it (no data is loaded and nothing trains): a misspelt argument or a
    removed class fails here, not after hours of runs."""
    from examples.bench_runner import instantiate, load_config, stream_methods

    try:
        cfg = load_config(path)
    except Exception as err:  # the text streams resolve ${minilm:} to the offline MiniLM package
        if "MiniLM" in str(err) or "minilm" in str(err):
            pytest.skip(f"{path.name} needs the offline MiniLM package: {err}")
        raise
    built: dict[str, object] = {}
    for sname, s in cfg["streams"].items():
        instantiate(s["datamodule"], seed=0)
        for m in stream_methods(cfg, sname):
            spec = substitute(cfg["methods"][m] or {}, s.get("params", {}) or {}, f"{sname}/{m}")
            if "avalanche" in spec:
                continue  # the peers' arguments are checked by check_config and tests above
            model_kw = {**(s.get("model") or {}), **(spec.get("model") or {})}
            key = json.dumps(model_kw, sort_keys=True)
            if key not in built:
                built[key] = ContinualClassifier(**model_kw)
            for cb in spec.get("callbacks", []) or []:
                instantiate(cb)


def test_every_method_gets_its_own_run_folder():
    """'DER 500' and 'DER++ 500' once shared a folder (the '+' dropped): the second overwrote the first's heatmap."""
    from examples.bench_runner import _slug

    assert _slug("DER 500") != _slug("DER++ 500") and _slug("DER++ 500") == "DERpp_500"
    assert _slug("joint (upper bound)") == "joint_upper_bound"
    with pytest.raises(BenchConfigError, match="same run folder"):
        check_config(_cfg(**{"ER 1": {}, "ER-1": {}, "ER/1": {}}))


def test_an_interrupted_table_resumes_from_its_last_finished_run(tmp_path, monkeypatch):
    import examples.bench_runner as runner

    out = str(tmp_path / "out")
    common = ["--methods", "naive", "ER", "--output-dir", out, "--no-progress", "--in-process"]
    real = runner.run_one

    def interrupted(cfg, stream, method, seed, *rest):
        if method == "ER":
            raise KeyboardInterrupt
        return real(cfg, stream, method, seed, *rest)

    monkeypatch.setattr(runner, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([str(SMOKE), *common])
    saved = json.loads((Path(out) / "smoke" / "results.json").read_text())
    assert [r["method"] for r in saved] == ["naive"]  # written when naive finished, before ER broke off
    monkeypatch.setattr(runner, "run_one", real)
    resumed = main([str(SMOKE), "--reuse", *common])
    assert resumed[0] == saved[0] and resumed[1]["method"] == "ER"
