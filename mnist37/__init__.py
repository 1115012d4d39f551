"""mnist37: fastbook's pixel-similarity baseline as a distributed batch evaluation job on Ray.

The data comes in through the sources layer (`mnist37.sources`: one module per format, one
table of formats); the numeric core (PNG decode, Arrow chunks, pixel sums, prototypes,
distances, confusion) lives in plain modules; `mnist37.distributed` is the one module that
turns it into Ray tasks. docs/architecture.md walks through the layout.
"""

__version__ = "0.1.0"


class Mnist37Error(Exception):
    """A problem with the user's input or configuration, reported as one line, never a traceback."""


class DatasetError(Mnist37Error, ValueError):
    """A data set that does not have the expected layout or contents."""
