"""Lightning callbacks: thin adapters over the method cores in ``cl_plugins``."""

from callbacks.base import ContinualCallback, get_stream
from callbacks.joint import JointTraining
from callbacks.replay import ExperienceReplay

__all__ = ["ContinualCallback", "ExperienceReplay", "JointTraining", "get_stream"]
