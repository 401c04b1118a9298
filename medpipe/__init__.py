"""medpipe: medical imaging collections to de-identified Zarr datasets, trained and evaluated models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medpipe")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
