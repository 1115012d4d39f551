"""mnist37: fastbook's pixel-similarity baseline as a distributed batch evaluation job on Ray.

The numeric core (folder scan, decode, Arrow chunks, pixel sums, prototypes,
distances, confusion) lives in plain modules; `mnist37.distributed` is the one
module that turns it into Ray tasks.
"""

__version__ = "0.1.0"


class Mnist37Error(Exception):
    """A problem with the user's input or configuration, reported as one line, never a traceback."""
