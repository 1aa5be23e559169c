"""The README's features x backends table is the generated one; declarations are catalogued."""

from __future__ import annotations

from adapters.base import AdapterContext
from adapters.echo import EchoAdapter
from helpers import ROOT
from schemas.features import FEATURES, check_declared
from tools.features_table import declared, replace_table, table


def test_readme_table_is_generated() -> None:
    """Regenerate with `python -m tools.features_table --write README.md` when this fails."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert table() in readme
    assert replace_table(readme, table()) == readme


def test_every_declared_feature_is_catalogued() -> None:
    """Each backend of adapters.yaml declares only catalogued names (a typo would refuse)."""
    for features in declared().values():
        check_declared(features)
        assert features <= FEATURES.keys()


def test_loaded_capabilities_stay_within_the_declaration() -> None:
    """Echo's capabilities (no engine needed) are a subset of its class's declaration."""
    adapter = EchoAdapter(AdapterContext("echo"))
    assert adapter.capabilities.features <= EchoAdapter.declared_features


def test_no_adapter_honours_an_undeclared_feature_in_its_source() -> None:
    """Every adapter builds its capabilities' features from its declaration, never a literal.

    A loaded engine cannot be had here for each backend, so the rule is checked where it can
    drift: no adapter module spells a feature set of its own inside `Capabilities(...)`.
    """
    for path in sorted((ROOT / "adapters").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "features=frozenset(" not in text, f"{path.name}: use declared_features"
