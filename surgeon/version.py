"""The installed distribution's version, recorded in every file surgeon writes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffusion-surgeon")
except PackageNotFoundError:  # a bare checkout on sys.path, not installed
    __version__ = "0+unknown"
