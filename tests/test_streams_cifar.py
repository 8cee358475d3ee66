"""Split-CIFAR-10 from the local JPEGs (decode cache, few-shot subsets, augmentation) and the
Avalanche Split-CIFAR wrapper (offline error, transforms) without any download."""

from __future__ import annotations

import io
import multiprocessing
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import AvalancheSplitCIFAR, DataNotFoundError, SplitCIFAR10, StreamConfigError
from datamodules import cifar as cifar_mod
from datamodules import sources as sources_mod
from datamodules.imagedata import ImageTensorDataset
from tests.conftest import SHARED_DATA

ARCHIVE = SHARED_DATA / cifar_mod.ARCHIVE_NAME


@pytest.fixture(scope="module")
def cifar_archive() -> Path:
    """The shared archive, decoded once into the default cache (later sessions just load it)."""
    if not ARCHIVE.is_file():
        pytest.skip(f"{ARCHIVE} not found (set CL_DATA_ROOT to the shared data folder)")
    cifar_mod.load_cifar10_jpg(str(ARCHIVE))
    return ARCHIVE


def test_decoded_cifar10_is_complete_and_in_label_order(cifar_archive: Path):
    data = cifar_mod.load_cifar10_jpg(str(cifar_archive))
    assert data["classes"] == list(cifar_mod.CIFAR10_CLASSES)
    assert data["train_x"].shape == (50000, 3, 32, 32) and data["train_x"].dtype == torch.uint8
    assert data["test_x"].shape == (10000, 3, 32, 32)
    assert torch.bincount(data["train_y"]).tolist() == [5000] * 10
    assert torch.bincount(data["test_y"]).tolist() == [1000] * 10
    mean, std = cifar_mod.cifar_tensor_stats(data["train_x"][::10])
    assert np.allclose(mean, cifar_mod.CIFAR10_MEAN, atol=5e-3)  # JPEG q75 moves the stats a little
    assert np.allclose(std, cifar_mod.CIFAR10_STD, atol=1e-2)


def test_split_cifar10_stream(cifar_archive: Path):
    dm = SplitCIFAR10(root=str(cifar_archive), test_samples_per_class=50, batch_size=64, eval_batch_size=64)
    assert dm.num_experiences == 5 and dm.scenario == "class" and dm.num_classes == 10
    assert dm.classes_in_experience == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert [len(dm.train_dataset(i)) for i in range(5)] == [10000] * 5
    assert [len(dm.test_dataset(i)) for i in range(5)] == [100] * 5
    x, y, t = next(iter(dm.val_dataloader()[3]))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and set(y.tolist()) <= {6, 7}
    lo = (0 - torch.tensor(cifar_mod.CIFAR10_MEAN)) / torch.tensor(cifar_mod.CIFAR10_STD)
    hi = (1 - torch.tensor(cifar_mod.CIFAR10_MEAN)) / torch.tensor(cifar_mod.CIFAR10_STD)
    per_channel = x.transpose(0, 1).flatten(1)
    assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()
    assert per_channel.mean().abs() < 0.5 and 0.5 < per_channel.std() < 1.5


def test_few_shot_subsets_are_fixed_and_balanced(cifar_archive: Path):
    dm = SplitCIFAR10(root=str(cifar_archive), n_experiences=2, scenario="task", train_samples_per_class=4,
                      test_samples_per_class=2, image_size=48)
    assert dm.task_labels == [(0,), (1,)] and dm.classes_in_experience == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    assert [len(dm.train_dataset(i)) for i in range(2)] == [20, 20]
    ys = [int(dm.train_dataset(1)[i][1]) for i in range(20)]
    assert sorted(ys) == sorted([5, 6, 7, 8, 9] * 4)
    x, _, t = dm.train_dataset(1)[0]
    assert x.shape == (3, 48, 48) and int(t) == 1 and dm.input_shape == (3, 48, 48)
    again = SplitCIFAR10(root=str(cifar_archive), n_experiences=2, train_samples_per_class=4, test_samples_per_class=2)
    other = SplitCIFAR10(root=str(cifar_archive), n_experiences=2, train_samples_per_class=4, test_samples_per_class=2,
                         subset_seed=1)
    same = SplitCIFAR10(root=str(cifar_archive), n_experiences=2, train_samples_per_class=4, test_samples_per_class=2)
    first = torch.stack([again.train_dataset(0)[i][0] for i in range(20)])
    assert torch.equal(first, torch.stack([same.train_dataset(0)[i][0] for i in range(20)]))
    assert not torch.equal(first, torch.stack([other.train_dataset(0)[i][0] for i in range(20)]))


def test_augmentation_is_pad4_crop_and_flip_on_training_data_only():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    plain = ImageTensorDataset(img, torch.tensor([0]))[0][0]
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    candidates = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    candidates += [c.flip(-1) for c in candidates]
    aug = ImageTensorDataset(img, torch.tensor([0]), augment=True)
    torch.manual_seed(0)
    draws = [aug[0][0] for _ in range(30)]
    for d in draws:
        assert any(torch.equal(d, c) for c in candidates)
    assert len({d.sum().item() for d in draws}) > 5  # it does vary
    assert any(not torch.equal(d, plain) for d in draws)


def test_split_cifar10_augments_train_not_test(cifar_archive: Path):
    dm = SplitCIFAR10(root=str(cifar_archive), augment=True, train_samples_per_class=2, test_samples_per_class=2)
    torch.manual_seed(0)
    train = [dm.train_dataset(0)[0][0] for _ in range(8)]
    test = [dm.test_dataset(0)[0][0] for _ in range(3)]
    assert any(not torch.equal(train[0], t) for t in train[1:])
    assert all(torch.equal(test[0], t) for t in test[1:])


def _tiny_jpeg_tree(folder: Path) -> None:
    g = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("b_cls", "a_cls"):
            (folder / split / cls).mkdir(parents=True)
            for k in range(n):
                arr = g.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / split / cls / f"{k:04d}.jpg", quality=90)


def test_archive_and_folder_decode_alike_and_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tree = tmp_path / "tree"
    _tiny_jpeg_tree(tree)
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(tree / split, arcname=split)
    cache = tmp_path / "cache"
    a = cifar_mod.load_cifar10_jpg(str(archive), str(cache))
    b = cifar_mod.load_cifar10_jpg(str(tree), str(cache))
    assert a["classes"] == ["a_cls", "b_cls"] and a["train_y"].tolist() == [0, 0, 0, 1, 1, 1]
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(a[key], b[key]), key
    first = Image.open(io.BytesIO((tree / "train" / "a_cls" / "0000.jpg").read_bytes())).convert("RGB")
    assert torch.equal(a["train_x"][0], torch.from_numpy(np.asarray(first)).permute(2, 0, 1))
    assert len(list(cache.glob("cifar10_jpg-*.pt"))) == 2 and not list(cache.glob("*.lock"))
    # a fresh process (empty memory cache) loads the file instead of decoding again
    cifar_mod._MEMORY.clear()

    def no_decode(source):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cifar_mod, "decode_image_folder_tree", no_decode)
    c = cifar_mod.load_cifar10_jpg(str(archive), str(cache))
    assert torch.equal(c["test_x"], a["test_x"])


def test_missing_cifar_root_errors(tmp_path: Path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        SplitCIFAR10(root=str(tmp_path / "nope")).build_benchmark()
    with pytest.raises(DataNotFoundError) as info:
        SplitCIFAR10(root=str(tmp_path)).build_benchmark()
    assert str(tmp_path) in str(info.value) and "cifar10_jpg.tar.gz" in str(info.value)
    with pytest.raises(StreamConfigError, match="class- or task-incremental"):
        SplitCIFAR10(scenario="domain")


class FakeTorchvisionCIFAR:
    """What torchvision's CIFAR10 gives Avalanche: PIL images and a ``targets`` list."""

    def __init__(self, n_per_class: int, classes: int = 10, seed: int = 0) -> None:
        g = np.random.default_rng(seed)
        self.targets = [c for c in range(classes) for _ in range(n_per_class)]
        self.data = g.integers(0, 256, (len(self.targets), 32, 32, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.data[i]), self.targets[i]


def test_avalanche_split_cifar_wraps_the_classic_benchmark(monkeypatch: pytest.MonkeyPatch):
    from avalanche.benchmarks.classic import ccifar10

    monkeypatch.setattr(ccifar10, "get_cifar10_dataset",
                        lambda root: (FakeTorchvisionCIFAR(4), FakeTorchvisionCIFAR(2, seed=1)))
    dm = AvalancheSplitCIFAR(which=10, n_experiences=5, scenario="task", augment=True)
    assert dm.classes_in_experience == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert dm.task_labels == [(i,) for i in range(5)]
    x, y, t = next(iter(dm.val_dataloader()[2]))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and set(y.tolist()) == {4, 5} and t.eq(2).all()
    assert x.min() < -1.0  # normalized, not [0, 1]


def test_avalanche_split_cifar_offline_error_is_raised_not_swallowed(monkeypatch: pytest.MonkeyPatch):
    from avalanche.benchmarks.classic import ccifar10

    def offline(root):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(ccifar10, "get_cifar10_dataset", offline)
    with pytest.raises(DataNotFoundError) as info:
        AvalancheSplitCIFAR(which=10, dataset_root="/tmp/nowhere").build_benchmark()
    msg = str(info.value)
    assert "SplitCIFAR10" in msg and "cifar10_jpg.tar.gz" in msg and "/tmp/nowhere" in msg
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    with pytest.raises(StreamConfigError, match="10 or 100"):
        AvalancheSplitCIFAR(which=20)


def test_default_search_lists_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from datamodules import sources

    monkeypatch.setattr(sources, "data_roots", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(DataNotFoundError) as info:
        SplitCIFAR10(cache_dir=str(tmp_path)).build_benchmark()
    msg = str(info.value)
    assert str(tmp_path / "a" / "cifar10_jpg.tar.gz") in msg and str(tmp_path / "b" / "cifar10_jpg") in msg
    assert "CL_DATA_ROOT" in msg


def _build_in_child(path: str, log: str) -> None:
    import time

    def build():
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(0.3)
        return {"x": torch.arange(5)}

    out = sources_mod.cached_build(Path(path), build)
    assert torch.equal(out["x"], torch.arange(5))


def test_concurrent_builders_decode_once(tmp_path: Path):
    """Two processes (like two DDP ranks) asking for the same cache file build it once."""
    ctx = multiprocessing.get_context("fork")
    target, log = tmp_path / "c.pt", tmp_path / "log.txt"
    procs = [ctx.Process(target=_build_in_child, args=(str(target), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text().count("built") == 1
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(5))
    assert not list(tmp_path.glob("*.tmp*"))
