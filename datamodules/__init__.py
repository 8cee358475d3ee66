"""Continual streams as LightningDataModules."""

from datamodules.digits import SplitDigits
from datamodules.stream import ContinualDataModule, ExperienceInfo, StreamConfigError

__all__ = ["ContinualDataModule", "ExperienceInfo", "SplitDigits", "StreamConfigError"]
