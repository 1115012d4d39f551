"""mnist37: fastbook's pixel-similarity baseline as a distributed batch evaluation job on Ray.

The data comes in through the sources layer (`mnist37.sources`: one module per format, one
table of formats); the numeric core (PNG decode, Arrow chunks, pixel sums, prototypes,
distances, confusion) lives in plain modules; `mnist37.on_ray` is the one package that
turns it into Ray tasks. docs/architecture.md walks through the layout.

From Python (docs/api.md): `mnist37.evaluate(data, out=None, **config)` runs the job in this
process and returns its `Results`; `mnist37.load(out)` reads a finished run's.
"""

__version__ = "0.1.0"


class Mnist37Error(Exception):
    """A problem with the user's input or configuration, reported as one line, never a traceback."""


class DatasetError(Mnist37Error, ValueError):
    """A data set that does not have the expected layout or contents."""


# The Python API, imported on first use: `import mnist37` stays as light as it was for the
# tasks and tools that import the package's modules.
_API = ("evaluate", "load", "Results", "ResultsNotFound", "NoPredictions")
__all__ = ["Mnist37Error", "DatasetError", *_API]


def __getattr__(name: str):
    if name in _API:
        from mnist37 import api

        return getattr(api, name)
    raise AttributeError(f"module 'mnist37' has no attribute {name!r}")
