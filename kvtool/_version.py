"""The version of this kvtool (one place: the package and its artifacts read it here)."""

__version__ = "0.1.0"
