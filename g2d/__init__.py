"""g2d: pre-train chest X-ray encoders with G2D and measure what they are worth."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("g2d")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
