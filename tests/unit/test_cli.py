"""The command line a new user meets: --version, --help, validate, and the admin-key banner."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT
from service import cli


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m service.cli ARGS` from the repository root, output captured (not a TTY)."""
    return subprocess.run(  # noqa: S603  (our own interpreter and module, fixed arguments)
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints `inference-wrapper <version>` and exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("inference-wrapper ")
    assert out.split()[1][0].isdigit()


def test_help_is_for_users_not_maintainers(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` describes the tool and its commands; the docstring's "Must never" stays out."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "Must never" not in out
    assert "OpenAI-compatible" in out
    assert "validate" in out
    assert "serve" in out
    assert "--version" in out


def test_validate_accepts_the_shipped_registry(capsys: pytest.CaptureFixture[str]) -> None:
    """`validate adapters.yaml` exits 0 and names the adapters it found."""
    assert cli.main(["validate", str(ROOT / "adapters.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out
    assert "echo" in out


def test_validate_names_key_and_line_of_a_bad_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad key exits 2 with the key path and its line on stderr."""
    bad = tmp_path / "adapters.yaml"
    bad.write_text("adapters:\n  echo:\n    module: adapters.echo:EchoAdapter\n    defualts: {}\n")
    assert cli.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "defualts" in err
    assert "(line " in err


def test_validate_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A registry path that does not exist is a clean exit 2, not a traceback."""
    assert cli.main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_generated_key_goes_to_a_private_file_when_not_a_tty(tmp_path: Path) -> None:
    """Without a TTY the generated admin key is written 0600 and only its path is logged."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
        "IW_CACHE_DIR": str(tmp_path),
        "IW_LOG_FORMAT": "json",
        # an invalid registry makes serve stop right after the key is handled
        "IW_REGISTRY": str(tmp_path / "missing.yaml"),
    }
    proc = run_cli("serve", env=env)
    assert proc.returncode == 2, proc.stderr
    key_file = tmp_path / "admin-key"
    key = key_file.read_text().strip()
    assert len(key) >= 24
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key not in proc.stdout + proc.stderr
    assert str(key_file) in proc.stderr


def test_generated_key_file_is_made_private_even_if_it_existed(tmp_path: Path) -> None:
    """A pre-existing, world-readable key file is rewritten with mode 0600."""
    key_file = tmp_path / "admin-key"
    key_file.write_text("old")
    key_file.chmod(0o644)
    cli._announce_admin_key("k" * 32, tmp_path)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() == "k" * 32
