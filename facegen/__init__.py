"""facegen: generate, clean, shard and validate synthetic face-recognition datasets on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("facegen")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
