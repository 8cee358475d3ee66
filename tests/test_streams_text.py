"""The AG News -> Yelp -> Amazon -> DBpedia text stream: layout, splits, tokenization, cache, fit."""

from __future__ import annotations

import tarfile
import unicodedata
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from cl_plugins import ContinualClassifier
from datamodules import DataNotFoundError, StreamConfigError, TextCLStream
from datamodules import text as text_mod
from tests.conftest import SHARED_DATA, quiet_trainer_kwargs

ARCHIVE = SHARED_DATA / text_mod.ARCHIVE_NAME
TINY_BERT = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def archive() -> Path:
    if not ARCHIVE.is_file():
        pytest.skip(f"{ARCHIVE} not found (set CL_DATA_ROOT to the shared data folder)")
    return ARCHIVE


@pytest.fixture(scope="module")
def small(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> TextCLStream:
    cache = tmp_path_factory.mktemp("text_cache")
    return TextCLStream(root=str(archive), max_length=32, max_train_per_task=56, max_test_per_task=28,
                        cache_dir=str(cache), batch_size=16, eval_batch_size=16)


def test_class_incremental_layout(small: TextCLStream):
    assert small.num_experiences == 4 and small.scenario == "class" and small.num_classes == 28
    assert small.classes_in_experience == [tuple(range(0, 4)), tuple(range(4, 9)), tuple(range(9, 14)),
                                           tuple(range(14, 28))]
    assert small.task_labels == [(0,)] * 4 and small.class_offsets == [0, 4, 9, 14]
    assert small.label_names[0] == "agnews:World" and small.label_names[27] == "dbpedia:Written Work"
    assert [len(small.train_dataset(i)) for i in range(4)] == [56] * 4
    assert [len(small.test_dataset(i)) for i in range(4)] == [28] * 4
    x, y, t = next(iter(small.val_dataloader()[3]))
    assert x.dtype == torch.long and x.shape == (16, 32) and y.min() >= 14 and y.max() <= 27 and t.eq(0).all()
    assert x.min() >= 0 and x.max() < small.vocab_size == 30522
    assert (x[:, 0] == 101).all()  # [CLS] of the MiniLM (BERT uncased) vocabulary
    assert small.pad_token_id == 0


def test_task_incremental_labels(archive: Path, small: TextCLStream):
    dm = TextCLStream(root=str(archive), tasks=["dbpedia", "agnews"], scenario="task", max_length=32,
                      max_train_per_task=28, max_test_per_task=14, cache_dir=small.cache_dir)
    assert dm.task_labels == [(0,), (1,)] and dm.scenario == "task"
    assert dm.classes_in_experience == [tuple(range(14)), tuple(range(14, 18))]
    assert int(dm.test_dataset(1)[0][2]) == 1


def _normalized(text: str) -> str:
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch) != "Mn")


def test_tokenization_round_trip(small: TextCLStream):
    tok = small.tokenizer()
    tasks = small.read_tasks()
    checked = 0
    for k, task in enumerate(tasks):
        for i in range(5):
            ids = small.train_dataset(k)[i][0]
            y = int(small.train_dataset(k)[i][1])
            assert y - small.class_offsets[k] == task.train_labels[i]
            text = task.train_texts[i]
            if not text.isascii():
                continue
            decoded = tok.decode(ids, skip_special_tokens=True)
            # truncated to 32 tokens: the decoded text is a prefix of the (lower-cased) sentence
            assert _normalized(text).startswith(_normalized(decoded)), (decoded, text)
            assert len(_normalized(decoded)) > 40
            n_real = int((ids != small.pad_token_id).sum())
            assert ids[n_real - 1] == 102 and (ids[n_real:] == 0).all()  # [SEP] then padding
            checked += 1
    assert checked >= 10


def test_single_split_tasks_are_split_80_20(archive: Path):
    yelp, dbpedia, agnews = text_mod.load_text_tasks(archive, ["yelp", "dbpedia", "agnews"], split_seed=0)
    assert (len(yelp.train_texts), len(yelp.test_texts)) == (4000, 1000)
    assert (len(dbpedia.train_texts), len(dbpedia.test_texts)) == (6080, 1520)
    assert (len(agnews.train_texts), len(agnews.test_texts)) == (4000, 7600)
    assert not set(yelp.train_texts) & set(yelp.test_texts)
    assert len(dbpedia.label_names) == 14 and set(dbpedia.train_labels) == set(range(14))
    again = text_mod.load_text_tasks(archive, ["yelp"], split_seed=0)[0]
    assert again.test_texts == yelp.test_texts
    other = text_mod.load_text_tasks(archive, ["yelp"], split_seed=1)[0]
    assert other.test_texts != yelp.test_texts


def test_token_cache_is_keyed_by_settings(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    kw = dict(root=str(archive), tasks=["agnews"], max_train_per_task=8, max_test_per_task=4, cache_dir=str(tmp_path))
    first = TextCLStream(max_length=16, **kw)
    x = first.train_dataset(0)[3][0]
    calls = []
    real = text_mod.tokenize
    monkeypatch.setattr(text_mod, "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    warm = TextCLStream(max_length=16, **kw)
    assert torch.equal(warm.train_dataset(0)[3][0], x) and not calls  # loaded from the cache
    longer = TextCLStream(max_length=24, **kw)
    assert longer.train_dataset(0)[3][0].shape == (24,) and calls  # a new setting tokenizes again
    n = int((x != 0).sum())
    assert torch.equal(longer.train_dataset(0)[3][0][: n - 1], x[: n - 1])  # same tokens before [SEP]


def test_text_errors(archive: Path, tmp_path: Path):
    with pytest.raises(StreamConfigError, match="available tasks are .*agnews"):
        TextCLStream(root=str(archive), tasks=["nosuchtask"], cache_dir=str(tmp_path)).build_benchmark()
    with pytest.raises(DataNotFoundError, match="holds neither"):
        TextCLStream(root=str(tmp_path), cache_dir=str(tmp_path)).build_benchmark()
    with pytest.raises(DataNotFoundError, match="could not load a tokenizer"):
        TextCLStream(root=str(archive), tasks=["agnews"], tokenizer=str(tmp_path), max_train_per_task=4,
                     max_test_per_task=4, cache_dir=str(tmp_path)).build_benchmark()
    with pytest.raises(StreamConfigError, match="class- or task-incremental"):
        TextCLStream(scenario="domain")


def test_text_stream_trains_a_tiny_bert_in_one_fit(small: TextCLStream):
    pl.seed_everything(0)
    model = ContinualClassifier("hf-config", num_classes=small.num_classes, hf_config=TINY_BERT,
                                optimizer="adamw", lr=1e-3)
    trainer = pl.Trainer(**quiet_trainer_kwargs())
    trainer.fit(model, datamodule=small)
    assert trainer.max_epochs == 4 and trainer.current_epoch == 4
    assert model.net.pad_token_id == small.pad_token_id
    for j in range(4):
        assert torch.isfinite(trainer.callback_metrics[f"val/loss_exp{j}"])


def test_extracted_folder_reads_like_the_archive(archive: Path, tmp_path: Path):
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if "/TC/agnews/" in m.name]
        tf.extractall(tmp_path, members=members, filter="data")
    from_folder = text_mod.load_text_tasks(tmp_path, ["agnews"], max_train=12, max_test=6)
    from_archive = text_mod.load_text_tasks(archive, ["agnews"], max_train=12, max_test=6)
    assert from_folder == from_archive and from_folder[0].label_names[1] == "Sports"
    assert len(from_folder[0].train_texts) == 12 and len(set(from_folder[0].train_labels)) == 4
    for root in (tmp_path, tmp_path / "CL_Benchmark"):
        assert text_mod.resolve_text_source(str(root)) == tmp_path


def test_default_search_lists_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from datamodules import sources

    monkeypatch.setattr(sources, "data_roots", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(DataNotFoundError) as info:
        TextCLStream(cache_dir=str(tmp_path)).build_benchmark()
    msg = str(info.value)
    assert str(tmp_path / "a" / text_mod.ARCHIVE_NAME) in msg and str(tmp_path / "b" / "CL_Benchmark") in msg
    assert "CL_DATA_ROOT" in msg
