"""SecretStore masking in every encoded form, and the env checks and scope of a load."""

from __future__ import annotations

import json
import os
from urllib.parse import quote

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.env import ALWAYS_REFUSED, MAX_VALUE_BYTES, EnvScope, check_env
from registry.secrets import MASK, MIN_SECRET_LEN, SecretStore
from schemas.errors import ParamsValidationError


def store(*values: str) -> SecretStore:
    """A store holding `values`."""
    s = SecretStore()
    for value in values:
        s.add(value)
    return s


# --- SecretStore ---------------------------------------------------------------------------------


def test_raw_value_is_masked_everywhere() -> None:
    """Every occurrence of a registered value is replaced by the mask."""
    s = store("hf_canary_0001")
    assert s.mask("a hf_canary_0001 b hf_canary_0001") == f"a {MASK} b {MASK}"


def test_json_escaped_form_is_masked() -> None:
    """A value with quotes, backslashes or newlines is caught once JSON-encoded."""
    secret = 'pa"ss\\wo\nrd'
    s = store(secret)
    line = json.dumps({"message": f"token={secret}"})
    assert secret not in line  # the raw form is not what the log line holds
    masked = s.mask(line)
    assert json.dumps(secret)[1:-1] not in masked
    assert MASK in masked


def test_url_encoded_form_is_masked() -> None:
    """A value with URL-reserved characters is caught once percent-encoded."""
    secret = "a b/c?d&e=f"
    s = store(secret)
    url = f"https://hub/api?token={quote(secret, safe='')}"
    assert s.mask(url) == f"https://hub/api?token={MASK}"


def test_the_service_json_log_form_is_masked() -> None:
    """A non-ASCII value that needs escaping is masked in msgspec's JSON (the log formatter's)."""
    secret = 'pässwörd"42'
    s = store(secret)
    line = msgspec.json.encode({"message": f"token={secret}"}).decode()
    assert s.mask(line) == msgspec.json.encode({"message": f"token={MASK}"}).decode()


def test_short_values_are_ignored() -> None:
    """Values under MIN_SECRET_LEN characters are not patterns: masking them protects nothing."""
    short = "x" * (MIN_SECRET_LEN - 1)
    s = store(short, "")
    assert s.count == 0
    assert s.mask(f"{short} stays") == f"{short} stays"
    assert short not in s
    s.add("x" * MIN_SECRET_LEN)
    assert s.count == 1


def test_longest_secret_is_masked_whole() -> None:
    """A secret that contains another is masked as one, leaving no tail of the longer one."""
    s = store("abcd", "abcd-efgh-ijkl")
    assert s.mask("key abcd-efgh-ijkl end") == f"key {MASK} end"
    assert s.mask("key abcd end") == f"key {MASK} end"


def test_empty_store_and_duplicates() -> None:
    """An empty store is truthy and masks nothing; adding a value twice keeps one."""
    s = SecretStore()
    assert s
    assert s.mask("anything") == "anything"
    s.add("secret-1")
    s.add("secret-1")
    assert s.count == 1
    assert "secret-1" in s
    assert s.mask("") == ""


# UTF-8-encodable text (no lone surrogates); `*` is left out because it is the mask itself
_CHARS = st.characters(codec="utf-8", exclude_characters="*")
_SECRET_TEXT = st.text(
    alphabet=_CHARS,
    min_size=MIN_SECRET_LEN,
    max_size=20,
)
_AROUND = st.text(alphabet=_CHARS)


@settings(max_examples=200, deadline=None)
@given(secret=_SECRET_TEXT, before=_AROUND, after=_AROUND)
def test_no_form_of_a_secret_survives_masking(secret: str, before: str, after: str) -> None:
    """Raw, JSON-escaped and URL-encoded forms of any secret are gone after masking."""
    s = store(secret)
    for form in (secret, json.dumps(secret)[1:-1], quote(secret, safe="")):
        assert form not in s.mask(before + form + after)


# --- env checks ----------------------------------------------------------------------------------


def refused(env: dict[str, str], allow: tuple[str, ...] = ("*",)) -> ParamsValidationError:
    """The error check_env raises for `env`."""
    with pytest.raises(ParamsValidationError) as info:
        check_env(env, allow, "echo")
    return info.value


def test_allowlist_wildcards_and_case() -> None:
    """Patterns with `*` match, and a key matches whatever the case of key or pattern."""
    check_env({"VLLM_USE_V1": "1", "HF_TOKEN": "t"}, ("vllm_*", "HF_TOKEN"), "vllm")
    check_env({"hf_token": "t"}, ("HF_TOKEN",), "vllm")
    check_env({}, (), "vllm")
    err = refused({"AWS_KEY": "x"}, ("VLLM_*", "HF_TOKEN"))
    assert err.status_code == 422
    assert err.code == "env_refused"
    assert err.param == "$.env.AWS_KEY"
    assert "not allowed for backend 'echo'" in err.message


@pytest.mark.parametrize(
    "key",
    [
        "LD_PRELOAD",
        "ld_library_path",
        "PYTHONPATH",
        "PythonStartup",
        "PATH",
        "path",
        "BASH_ENV",
        "ENV",
        "GLIBC_TUNABLES",
        "HTTPS_PROXY",
        "https_proxy",
        "No_Proxy",
        "HF_ENDPOINT",
        "NODE_OPTIONS",
        "DYLD_INSERT_LIBRARIES",
        "IW_ADMIN_KEY",
    ],
)
def test_always_refused_keys_win_over_any_allowlist(key: str) -> None:
    """Keys that load code or redirect traffic are refused whatever the case, even under `*`."""
    err = refused({key: "x"}, ("*",))
    assert err.code == "env_refused"
    assert "never allowed" in err.message
    assert err.param == f"$.env.{key}"


def test_always_refused_list_covers_design() -> None:
    """The refused list holds every pattern DESIGN.md names."""
    design = {"LD_*", "PYTHON*", "PATH", "BASH_ENV", "ENV", "GLIBC_TUNABLES", "*_PROXY"}
    design |= {"HF_ENDPOINT", "NODE_OPTIONS", "DYLD_*"}
    assert design <= set(ALWAYS_REFUSED)


@pytest.mark.parametrize("key", ["", "1ABC", "A-B", "A B", "A=B", "é", "A" * 129])
def test_malformed_keys_are_refused_without_echoing_them(key: str) -> None:
    """A key that is not an identifier is refused at `$.env`, not at a path built from it."""
    err = refused({key: "x"})
    assert err.param == "$.env"
    assert err.code == "invalid_params"


@pytest.mark.parametrize("value", ["a\x00b", "x" * (MAX_VALUE_BYTES + 1)])
def test_unacceptable_values_are_refused_without_echoing_them(value: str) -> None:
    """A NUL byte or an oversized value is refused and the value is not in the message."""
    err = refused({"HF_TOKEN": value})
    assert value not in err.message
    assert err.param == "$.env.HF_TOKEN"


# --- EnvScope ------------------------------------------------------------------------------------


def test_scope_restores_previous_and_removes_new_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restore puts back a key's old value and removes the keys that were not set before."""
    monkeypatch.setenv("IW_TEST_OLD", "before")
    monkeypatch.delenv("IW_TEST_NEW", raising=False)
    scope = EnvScope({"IW_TEST_OLD": "during", "IW_TEST_NEW": "added"})
    assert scope.keys == ("IW_TEST_NEW", "IW_TEST_OLD")
    scope.apply()
    assert os.environ["IW_TEST_OLD"] == "during"
    assert os.environ["IW_TEST_NEW"] == "added"
    scope.restore()
    assert os.environ["IW_TEST_OLD"] == "before"
    assert "IW_TEST_NEW" not in os.environ


def test_restore_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second restore (or one before apply) changes nothing, even if the env moved since."""
    monkeypatch.delenv("IW_TEST_NEW", raising=False)
    scope = EnvScope({"IW_TEST_NEW": "added"})
    scope.restore()
    assert "IW_TEST_NEW" not in os.environ
    scope.apply()
    scope.restore()
    monkeypatch.setenv("IW_TEST_NEW", "someone else's")
    scope.restore()
    assert os.environ["IW_TEST_NEW"] == "someone else's"


def test_scope_can_be_applied_again_after_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply → restore → apply → restore leaves the environment as it started."""
    monkeypatch.setenv("IW_TEST_OLD", "before")
    scope = EnvScope({"IW_TEST_OLD": "during"})
    for _ in range(2):
        scope.apply()
        assert os.environ["IW_TEST_OLD"] == "during"
        scope.restore()
        assert os.environ["IW_TEST_OLD"] == "before"
