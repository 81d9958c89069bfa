"""l4router: a pluggable layer-4 protocol router on Twisted."""

__version__ = "0.1.0"
