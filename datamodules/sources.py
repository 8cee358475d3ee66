"""Where the built-in streams find their data, and how they cache it.

- :func:`data_roots` lists the folders searched for the shared offline files
  (``$CL_DATA_ROOT``, then ``../shared/data`` next to the repository).
- :func:`cache_dir` is where decoded tensors go (``$CL_PLUGINS_CACHE``, else
  ``$XDG_CACHE_HOME/cl_plugins``, else ``~/.cache/cl_plugins``).
- :func:`cached_build` builds a file once under a lock (DDP ranks and parallel runs share it)
  and writes it atomically, so a half-written cache is never read.
- :func:`read_idx` decodes the MNIST-format idx files (optionally gzipped).
- :func:`balanced_subset` picks fixed-seed, class-balanced subsets (few-shot and fast runs).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: the repository root (the folder holding ``datamodules/``)
REPO_ROOT = Path(__file__).resolve().parents[1]


class DataNotFoundError(FileNotFoundError):
    """A built-in stream could not find (or fetch) its data; the message says where it looked."""


def data_roots() -> list[Path]:
    """Folders that may hold the shared offline data files, in search order."""
    roots = []
    env = os.environ.get("CL_DATA_ROOT")
    if env:
        roots.append(Path(env).expanduser())
    roots.append((REPO_ROOT.parent / "shared" / "data").resolve())
    return roots


def locate_shared(root: str | os.PathLike[str] | None, names: Sequence[str], what: str) -> Path:
    """Returns ``root`` itself when given (it must exist), else the first of ``names`` found in
    :func:`data_roots`; raises :class:`DataNotFoundError` listing every place tried."""
    if root is not None:
        path = Path(root).expanduser()
        if not path.exists():
            raise DataNotFoundError(f"{what}: root '{path}' does not exist. Pass the folder or archive that holds it")
        return path
    tried = []
    for base in data_roots():
        for name in names:
            cand = base / name
            tried.append(str(cand))
            if cand.exists():
                return cand
    raise DataNotFoundError(
        f"{what} not found; looked in: {', '.join(tried)}. Pass root=<folder or archive>, or set "
        "CL_DATA_ROOT to the folder holding the shared data files"
    )


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder (created): ``override``, ``$CL_PLUGINS_CACHE``, ``$XDG_CACHE_HOME/cl_plugins``
    or ``~/.cache/cl_plugins``."""
    if override is not None:
        path = Path(override).expanduser()
    elif os.environ.get("CL_PLUGINS_CACHE"):
        path = Path(os.environ["CL_PLUGINS_CACHE"]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "cl_plugins"
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_fingerprint(path: Path) -> str:
    """Identity of a file or folder for cache keys: resolved path, size and mtime (cheap)."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def digest(*parts: Any) -> str:
    """A short hex digest of ``parts`` (their ``repr``), for cache file names."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): builds may repeat, the atomic write keeps them safe
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_build(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Loads the dict of tensors at ``path``, or builds it with ``build()`` and saves it.

    Concurrent callers (DDP ranks) wait on a lock file, so the work runs once; the file is written
    to a temporary name and renamed, so a reader never sees a partial file.
    """
    if path.exists():
        return torch.load(path, weights_only=True, mmap=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with _file_lock(lock):
        if path.exists():
            return torch.load(path, weights_only=True, mmap=True)
        data = build()
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, path)
        # a waiter holding the old lock file finds the data file and loads it; a newcomer sees it first
        lock.unlink(missing_ok=True)
    return data


# ----------------------------------------------------------------------------- idx files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> Tensor:
    """Decodes an idx file (the MNIST format; ``.gz`` or raw) into a tensor of its shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4]!r}); is the download corrupt?")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape))
    offset = 4 + 4 * ndim
    if len(raw) < offset + count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: expected {count} values of shape {shape}; is the download corrupt?")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True).reshape(shape))


# ----------------------------------------------------------------------------- subsets
def balanced_subset(
    targets: Tensor, seed: int, per_class: int | None = None, total: int | None = None
) -> Tensor:
    """Sorted indices of a fixed-seed subset with ``per_class`` samples of each class, or ``total``
    samples spread as evenly over the classes as the data allows.

    The samples of each class are taken in the order of one seeded permutation, so a larger
    subset contains every smaller one drawn with the same seed.
    """
    targets = torch.as_tensor(targets).long()
    n = len(targets)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = targets[perm]
    # rank of each sample within its class, in permutation order
    order = torch.argsort(shuffled, stable=True)
    sorted_t = shuffled[order]
    starts = torch.searchsorted(sorted_t, sorted_t, side="left")
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"samples per class must be >= 1, got {per_class}")
        chosen = perm[rank < per_class]
    elif total is not None:
        if total < 1:
            raise ValueError(f"subset size must be >= 1, got {total}")
        # round-robin over classes: all rank-0 samples first, then rank 1, ...
        by_rank = torch.argsort(rank, stable=True)
        chosen = perm[by_rank[:total]]
    else:
        raise ValueError("balanced_subset needs per_class or total")
    return torch.sort(chosen).values
