"""Batched reads of stream datasets: one indexing operation per batch instead of one ``__getitem__`` per sample.

An Avalanche dataset reads one sample at a time through its tree of wrappers (subsets, concatenations,
transform groups) and appends the task label, and the default collate then stacks the samples: in the
Seq-MNIST setting this costs about as much as the MLP's training step. :func:`batched_view` resolves the tree
once into ``(leaf, index)`` arrays and reads whole batches from the leaves with one fancy-indexing call per
column, so the loader yields the same batches, value for value and dtype for dtype (the first, middle and last
samples are compared with the per-sample path when the view is built).

It applies where every leaf can read batches: :class:`~datamodules.imagedata.ImageTensorDataset` without
augmentation or resizing (the MNIST and CIFAR streams), and ``TensorDataset`` (tensor streams). Any other
dataset, an active transform group, a data attribute that is not an integer per sample, or an Avalanche
version whose internals differ gives ``None``, and the stream keeps the per-sample path.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, TensorDataset, default_collate

log = logging.getLogger(__name__)


class _Unsupported(Exception):
    """The dataset's structure is not one the batched path understands (the per-sample path is used)."""


def _leaf_reader(leaf: Any) -> Any:
    """``indices -> list of columns`` for a leaf dataset that can read batches, else raises ``_Unsupported``."""
    if callable(getattr(leaf, "get_batch", None)) and getattr(leaf, "supports_batches", False):
        return lambda idx: list(leaf.get_batch(idx))
    if isinstance(leaf, TensorDataset):
        tensors = leaf.tensors
        # Avalanche's tensor classification dataset returns the label as a Python number (``.item()``), which
        # the default collate turns into int64 / float64
        label_as_number = type(leaf).__name__ == "_TensorClassificationDataset"

        def read(idx: Tensor) -> list[Tensor]:
            cols = [t[idx] for t in tensors]
            if label_as_number:
                cols[1] = cols[1].to(torch.float64 if cols[1].is_floating_point() else torch.int64)
            return cols

        return read
    raise _Unsupported(f"leaf {type(leaf).__name__} cannot read batches")


def _avalanche_types() -> tuple[type, type]:
    from avalanche.benchmarks.utils.data import AvalancheDataset, _FlatDataWithTransform

    return AvalancheDataset, _FlatDataWithTransform


#: a column remapping ``(column, lookup table)``: ``column <- table[column]``
ColumnMap = tuple[int, Tensor]


def _column_maps(groups: Any, group: str) -> list[ColumnMap]:
    """The active transform of a transform-groups object as column remappings: nothing for no transform, one
    remapping per ``partial(lookup, table)`` in a ``TupleTransform`` (Avalanche's class-id mapping of
    ``nc_benchmark``); anything else raises ``_Unsupported``."""
    from avalanche.benchmarks.utils.classification_dataset import lookup
    from avalanche.benchmarks.utils.transforms import TupleTransform

    table = getattr(groups, "transform_groups", None)
    if table is None:
        if groups is None:
            return []
        raise _Unsupported(f"transform groups {type(groups).__name__}")
    try:
        transform = table[group]
    except KeyError as err:  # the per-sample read would fail the same way: leave it to that path
        raise _Unsupported(f"no transform group {group!r}") from err
    if transform is None:
        return []
    if type(transform) is not TupleTransform:
        raise _Unsupported(f"transform {type(transform).__name__}")
    maps = []
    for column, fn in enumerate(transform.transforms):
        if fn is None:
            continue
        if not (isinstance(fn, functools.partial) and fn.func is lookup and len(fn.args) == 1 and not fn.keywords):
            raise _Unsupported(f"transform {fn!r} of column {column}")
        values = list(fn.args[0])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise _Unsupported("a lookup table that is not integers")
        maps.append((column, torch.tensor(values, dtype=torch.long)))
    return maps


class _Leaves:
    """The distinct (leaf dataset, column remappings) pairs met while resolving a dataset."""

    def __init__(self) -> None:
        self.entries: list[tuple[Any, list[ColumnMap]]] = []
        self._keys: list[tuple[int, tuple[tuple[int, tuple[int, ...]], ...]]] = []

    def id_of(self, leaf: Any, maps: list[ColumnMap]) -> int:
        _leaf_reader(leaf)  # raises when the leaf cannot read batches
        key = (id(leaf), tuple((c, tuple(t.tolist())) for c, t in maps))
        if key not in self._keys:
            self._keys.append(key)
            self.entries.append((leaf, maps))
        return self._keys.index(key)


def _resolve_flat(node: Any, idx: Tensor, group: str, leaves: _Leaves, outer: list[ColumnMap]) -> Tensor:
    """Leaf id and leaf index (rows of a (2, n) tensor) of positions ``idx`` of an Avalanche
    ``_FlatDataWithTransform``. ``outer``: the remappings the ancestors apply after this node's."""
    _, flat_cls = _avalanche_types()
    if type(node) is not flat_cls:
        raise _Unsupported(f"node {type(node).__name__}")
    # a node applies its frozen transforms, then its transforms, to what its child returns
    maps = _column_maps(node._frozen_transform_groups, group) + _column_maps(node._transform_groups, group) + outer
    if node._indices is not None:
        idx = torch.as_tensor(node._indices, dtype=torch.long)[idx]
    out = torch.empty(2, len(idx), dtype=torch.long)
    if len(node._datasets) == 1:
        parts = [(0, torch.ones(len(idx), dtype=torch.bool), idx)]
    else:
        cumulative = torch.as_tensor(node._cumulative_sizes, dtype=torch.long)
        which = torch.searchsorted(cumulative, idx, right=True)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), cumulative])[which]
        parts = [(d, which == d, idx - offsets) for d in range(len(node._datasets))]
    for d, mask, local in parts:
        if not bool(mask.any()):
            continue
        child = node._datasets[d]
        if type(child) is flat_cls:
            out[:, mask] = _resolve_flat(child, local[mask], group, leaves, maps)
        else:
            out[0, mask] = leaves.id_of(child, maps)
            out[1, mask] = local[mask]
    return out


class BatchedView(Dataset):
    """The samples of a stream dataset, read a batch at a time (``__getitems__``) as the list of columns the
    default collate would build; use it with :func:`collate_batched` as the loader's ``collate_fn``."""

    def __init__(self, leaves: Sequence[tuple[Any, list[ColumnMap]]], where: Tensor, extra: Sequence[Tensor]) -> None:
        self.leaves = list(leaves)  # (leaf dataset, the column remappings applied to what it returns)
        self.readers = [_leaf_reader(leaf) for leaf, _ in self.leaves]
        self.where = where  # (2, n): leaf id, index in that leaf
        self.extra = list(extra)  # appended integer columns (Avalanche's task labels)

    def _read(self, i: int, local: Tensor) -> list[Tensor]:
        columns = self.readers[i](local)
        for column, table in self.leaves[i][1]:
            columns[column] = table[columns[column]]
        return columns

    def __len__(self) -> int:
        return self.where.shape[1]

    def __getitem__(self, index: int) -> list[Any]:
        return [col[0] for col in self.__getitems__([index])]

    def __getitems__(self, indices: Sequence[int]) -> list[Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        leaf_ids, local = self.where[0, idx], self.where[1, idx]
        if len(self.leaves) == 1:
            columns = self._read(0, local)
        else:
            columns = []
            for i in range(len(self.leaves)):
                mask = leaf_ids == i
                if not bool(mask.any()):
                    continue
                part = self._read(i, local[mask])
                if not columns:
                    columns = [torch.empty((len(idx), *c.shape[1:]), dtype=c.dtype) for c in part]
                for col, values in zip(columns, part):
                    col[mask] = values
        return columns + [e[idx] for e in self.extra]

    def __getstate__(self) -> dict[str, Any]:  # the readers are closures: rebuilt after unpickling (workers)
        return {"leaves": self.leaves, "where": self.where, "extra": self.extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["leaves"], state["where"], state["extra"])


def collate_batched(batch: list[Tensor]) -> list[Tensor]:
    """The collate of a :class:`BatchedView` loader: the view already returns the collated columns."""
    return batch


def _int_column(attribute: Any, n: int) -> Tensor:
    """The values of an Avalanche data attribute as an int64 column (raises ``_Unsupported`` for non-integers)."""
    from avalanche.benchmarks.utils.flat_data import ConstantSequence

    data = attribute.data
    values = [data[0]] if isinstance(data, ConstantSequence) and len(data) == n else [attribute[i] for i in range(n)]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise _Unsupported("a data attribute that is not an integer per sample")
    column = torch.tensor(values, dtype=torch.long)
    return column.expand(n).clone() if len(values) == 1 else column


def _resolve(dataset: Any) -> tuple[list[tuple[Any, list[ColumnMap]]], Tensor, list[Tensor]]:
    if isinstance(dataset, ConcatDataset):
        parts = [_resolve(d) for d in dataset.datasets]
        if len({len(extra) for _, _, extra in parts}) != 1:
            raise _Unsupported("concatenated datasets with different columns")
        registry = _Leaves()
        wheres = []
        for part_leaves, where, _ in parts:
            remap = [registry.id_of(leaf, maps) for leaf, maps in part_leaves]
            where = where.clone()
            where[0] = torch.as_tensor(remap, dtype=torch.long)[where[0]]
            wheres.append(where)
        extras = [torch.cat([p[2][k] for p in parts]) for k in range(len(parts[0][2]))]
        return registry.entries, torch.cat(wheres, dim=1), extras
    avalanche_cls, _ = _avalanche_types()
    if not isinstance(dataset, avalanche_cls) or type(dataset).__getitem__ is not avalanche_cls.__getitem__:
        raise _Unsupported(f"dataset {type(dataset).__name__}")
    flat = dataset._flat_data
    n = len(dataset)
    leaves = _Leaves()
    where = _resolve_flat(flat, torch.arange(n), flat._transform_groups.current_group, leaves, [])
    extra = [_int_column(da, n) for da in dataset._data_attributes.values() if da.use_in_getitem]
    return leaves.entries, where, extra


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def batched_view(dataset: Dataset) -> BatchedView | None:
    """A :class:`BatchedView` of an Avalanche stream dataset (or a ``ConcatDataset`` of them) whose every
    sample comes from a leaf that reads batches, checked against the per-sample path on the first, middle and
    last samples; ``None`` where the per-sample path must be used."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            return None
        view = BatchedView(*_resolve(dataset))
    except (_Unsupported, ImportError, AttributeError) as err:  # AttributeError: other Avalanche internals
        log.debug("per-sample reads for %s: %s", type(dataset).__name__, err)
        return None
    probe = sorted({0, n // 2, n - 1})
    if not _same(view.__getitems__(probe), default_collate([dataset[i] for i in probe])):
        log.warning("the batched reads of %s differ from its samples: using per-sample reads", type(dataset).__name__)
        return None
    return view
