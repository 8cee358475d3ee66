"""Continual streams as LightningDataModules.

The streams are imported on first use (PEP 562): ``import datamodules`` and ``import callbacks`` do not
import Avalanche, which the built-in streams need only when one is constructed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the submodule that defines it
_EXPORTS = {
    "AvalancheSplitCIFAR": "datamodules.cifar",
    "SplitCIFAR10": "datamodules.cifar",
    "SplitDigits": "datamodules.digits",
    "SplitFashionMNIST": "datamodules.fashion",
    "ClassSplitStream": "datamodules.generic",
    "DatasetsStream": "datamodules.generic",
    "PermutedMNIST": "datamodules.mnist",
    "SplitMNIST": "datamodules.mnist",
    "DataNotFoundError": "datamodules.sources",
    "ContinualDataModule": "datamodules.stream",
    "ExperienceInfo": "datamodules.stream",
    "StreamConfigError": "datamodules.stream",
    "TextCLStream": "datamodules.text",
}

__all__ = [
    "AvalancheSplitCIFAR",
    "ClassSplitStream",
    "ContinualDataModule",
    "DataNotFoundError",
    "DatasetsStream",
    "ExperienceInfo",
    "PermutedMNIST",
    "SplitCIFAR10",
    "SplitDigits",
    "SplitFashionMNIST",
    "SplitMNIST",
    "StreamConfigError",
    "TextCLStream",
]

if TYPE_CHECKING:
    from datamodules.cifar import AvalancheSplitCIFAR, SplitCIFAR10
    from datamodules.digits import SplitDigits
    from datamodules.fashion import SplitFashionMNIST
    from datamodules.generic import ClassSplitStream, DatasetsStream
    from datamodules.mnist import PermutedMNIST, SplitMNIST
    from datamodules.sources import DataNotFoundError
    from datamodules.stream import ContinualDataModule, ExperienceInfo, StreamConfigError
    from datamodules.text import TextCLStream


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
