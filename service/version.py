"""The installed package's version, for `--version`, the OpenAPI document and the image label.

Must never: fail: a source tree that was never installed still answers.
"""

from __future__ import annotations

import importlib.metadata

__all__ = ["package_version"]


def package_version() -> str:
    """`inference-wrapper`'s version from its installed metadata, or `0+unknown`."""
    try:
        return importlib.metadata.version("inference-wrapper")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
