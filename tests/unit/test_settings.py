"""Settings from IW_* variables: parsing, lists, refusals of bad numbers, overrides, hidden keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings, SettingsError


def test_defaults_with_an_empty_environment() -> None:
    """No variables gives the laptop-safe defaults and no keys."""
    s = Settings.from_env({})
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.admin_keys == ()
    assert s.api_keys == ()
    assert s.registry_path == Path("adapters.yaml")
    assert s.log_format == "json"
    assert s.metrics_open is False
    assert s.preload is None


def test_every_variable_is_read() -> None:
    """Each IW_* variable lands in its field with the right type."""
    s = Settings.from_env(
        {
            "IW_HOST": "0.0.0.0",
            "IW_PORT": "9000",
            "IW_REGISTRY": "/etc/iw/adapters.yaml",
            "IW_MODEL_ROOTS": "/models, /data/models",
            "IW_CACHE_DIR": "/var/cache/iw",
            "IW_LOG_FORMAT": "TEXT",
            "IW_LOG_LEVEL": "debug",
            "IW_MAX_BODY_BYTES": "1024",
            "IW_MAX_CONCURRENCY": "3",
            "IW_MAX_QUEUE": "7",
            "IW_MAX_TOKENS": "100",
            "IW_MAX_MESSAGES": "5",
            "IW_TELEMETRY_RECORDS": "10",
            "IW_DRAIN_TIMEOUT_S": "2.5",
            "IW_WATCHDOG_INTERVAL_S": "0.5",
            "IW_METRICS_OPEN": "true",
            "IW_PRELOAD": "echo",
        }
    )
    assert (s.host, s.port) == ("0.0.0.0", 9000)
    assert s.registry_path == Path("/etc/iw/adapters.yaml")
    assert s.model_roots == (Path("/models"), Path("/data/models"))
    assert s.cache_dir == Path("/var/cache/iw")
    assert (s.log_format, s.log_level) == ("text", "DEBUG")
    assert (s.max_body_bytes, s.max_concurrency, s.max_queue) == (1024, 3, 7)
    assert (s.max_tokens_cap, s.max_messages, s.telemetry_records) == (100, 5, 10)
    assert (s.drain_timeout_s, s.watchdog_interval_s) == (2.5, 0.5)
    assert isinstance(s.port, int)
    assert isinstance(s.drain_timeout_s, float)
    assert s.metrics_open is True
    assert s.preload == "echo"


def test_key_lists_are_comma_separated_and_trimmed() -> None:
    """Keys split on commas; spaces around them and empty items are dropped."""
    s = Settings.from_env({"IW_ADMIN_KEY": " a1 , ,b2,", "IW_API_KEY": "k1,k2"})
    assert s.admin_keys == ("a1", "b2")
    assert s.api_keys == ("k1", "k2")
    assert Settings.from_env({"IW_API_KEY": " , "}).api_keys == ()


@pytest.mark.parametrize("value", ["1", "true", "YES", "True"])
def test_metrics_open_truthy_values(value: str) -> None:
    """IW_METRICS_OPEN accepts 1/true/yes in any case."""
    assert Settings.from_env({"IW_METRICS_OPEN": value}).metrics_open is True


@pytest.mark.parametrize("value", ["0", "false", "no", "on", ""])
def test_metrics_open_other_values_are_false(value: str) -> None:
    """Anything else leaves /metrics behind a key."""
    assert Settings.from_env({"IW_METRICS_OPEN": value}).metrics_open is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IW_PORT", "http"),
        ("IW_PORT", "80.5"),
        ("IW_PORT", "0"),
        ("IW_PORT", "-1"),
        ("IW_MAX_CONCURRENCY", "many"),
        ("IW_MAX_BODY_BYTES", "1e6"),
        ("IW_DRAIN_TIMEOUT_S", "soon"),
        ("IW_DRAIN_TIMEOUT_S", "-2"),
        ("IW_WATCHDOG_INTERVAL_S", "0"),
    ],
)
def test_bad_numbers_are_refused_by_name(name: str, value: str) -> None:
    """A number that does not parse, or is not positive, is a SettingsError naming the variable."""
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_nan_is_not_a_positive_number() -> None:
    """NaN is refused like any other non-positive value (it compares false to everything)."""
    with pytest.raises(SettingsError, match="IW_DRAIN_TIMEOUT_S"):
        Settings.from_env({"IW_DRAIN_TIMEOUT_S": "nan"})


def test_empty_number_means_default() -> None:
    """An empty variable is treated as unset."""
    assert Settings.from_env({"IW_PORT": ""}).port == 8000


def test_bad_log_format_is_refused() -> None:
    """IW_LOG_FORMAT must be json or text."""
    with pytest.raises(SettingsError, match="IW_LOG_FORMAT"):
        Settings.from_env({"IW_LOG_FORMAT": "xml"})


def test_overrides_win_and_none_overrides_are_ignored() -> None:
    """CLI overrides replace what the environment says; a None override leaves it."""
    env = {"IW_PORT": "9000", "IW_HOST": "0.0.0.0", "IW_PRELOAD": "echo"}
    s = Settings.from_env(env, port=7000, host=None, preload="other")
    assert (s.port, s.host, s.preload) == (7000, "0.0.0.0", "other")


def test_process_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, os.environ is read."""
    monkeypatch.setenv("IW_PORT", "8123")
    assert Settings.from_env().port == 8123


def test_keys_are_hidden_from_repr() -> None:
    """Repr and str never show admin or API keys."""
    s = Settings.from_env({"IW_ADMIN_KEY": "admin-sekrit-1", "IW_API_KEY": "api-sekrit-2"})
    for text in (repr(s), str(s)):
        assert "admin-sekrit-1" not in text
        assert "api-sekrit-2" not in text
    assert "port=8000" in repr(s)
