"""Prints the README's features x backends table, from the catalogue and the adapters' classes.

`python -m tools.features_table` prints it; `--write README.md` replaces the table between its
markers. Each backend of adapters.yaml contributes its adapter class's `declared_features` (read
from the class: no engine is loaded). tests/unit/test_features_table.py fails when the README's
table differs from this output.

Must never: load an engine or read anything but adapters.yaml and the adapter classes it names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from registry.registry import AdapterRegistry
from schemas.features import TABLE_BEGIN, TABLE_END, check_declared, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def declared(registry_file: Path = ROOT / "adapters.yaml") -> dict[str, frozenset[str]]:
    """Backend name -> the features its adapter class declares (checked against the catalogue)."""
    registry = AdapterRegistry.from_file(registry_file, use_entry_points=False)
    out: dict[str, frozenset[str]] = {}
    for name in registry.names:
        features = frozenset(getattr(registry.resolve(name).adapter_cls, "declared_features", ()))
        check_declared(features)
        out[name] = features
    return out


def table() -> str:
    """The table as the README holds it (markers included)."""
    return markdown_table(declared())


def replace_table(text: str, new: str) -> str:
    """`text` with the part between the markers (inclusive) replaced by `new`."""
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    return text[:start] + new + text[end:]


def main(argv: list[str] | None = None) -> int:
    """Print the table, or write it into a README."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the table in this file")
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(table() + "\n")
        return 0
    args.write.write_text(replace_table(args.write.read_text(encoding="utf-8"), table()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
