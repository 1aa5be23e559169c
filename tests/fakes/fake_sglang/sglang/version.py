"""The version the fake reproduces (real: sglang/version.py reads sglang._version)."""

__version__ = "0.5.23"
