"""Continual streams as LightningDataModules."""

from datamodules.cifar import AvalancheSplitCIFAR, SplitCIFAR10
from datamodules.digits import SplitDigits
from datamodules.fashion import SplitFashionMNIST
from datamodules.generic import ClassSplitStream, DatasetsStream
from datamodules.mnist import PermutedMNIST, SplitMNIST
from datamodules.sources import DataNotFoundError
from datamodules.stream import ContinualDataModule, ExperienceInfo, StreamConfigError
from datamodules.text import TextCLStream

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
