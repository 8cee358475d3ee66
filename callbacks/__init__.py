"""Lightning callbacks: thin adapters over the method cores in ``cl_plugins``."""

from callbacks.base import ContinualCallback, get_stream

__all__ = ["ContinualCallback", "get_stream"]
