"""`inference-wrapper serve|validate`: settings from IW_* and flags, logging, the app, uvicorn.

Must never: print a key except the one admin key it generated itself, once, to a terminal (a
log file or pipe gets the path of a 0600 file instead).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets as pysecrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from attrs import evolve

from registry.config import RegistryError
from registry.secrets import SecretStore
from service.logs import capture_output_as_json, configure_logging
from service.settings import Settings, SettingsError
from service.version import package_version

logger = logging.getLogger("inference_wrapper")

#: what uvicorn gives connections to close after the app's own drain (service/server.py)
_CLOSE_GRACE_S = 3

#: environment variables whose values are treated as secrets from the start
_SECRET_ENV = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)


#: what `--help` shows (the module docstring is for maintainers)
DESCRIPTION = (
    "One OpenAI-compatible, measured, secure HTTP face over LLM engines (transformers, vLLM, "
    "SGLang, an upstream OpenAI API, echo). Settings come from IW_* environment variables; "
    "flags override them. See README.md for the API and every setting."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inference-wrapper", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the service",
        description="Run the HTTP service (the admin key is generated when IW_ADMIN_KEY is unset).",
    )
    serve.add_argument("--host", help="bind address (IW_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (IW_PORT, default 8000)")
    serve.add_argument("--registry", type=Path, help="adapters.yaml (IW_REGISTRY)")
    serve.add_argument("--preload", help="preset to load at start-up (IW_PRELOAD)")
    serve.add_argument("--log-format", choices=["json", "text"], help="IW_LOG_FORMAT")
    validate = sub.add_parser(
        "validate",
        help="check an adapters.yaml and exit (0 valid, 2 invalid)",
        description="Parse adapters.yaml and import every adapter it names, without serving. "
        "Exit 0 when valid; 2 with the key and line of the first problem.",
    )
    validate.add_argument(
        "registry",
        nargs="?",
        type=Path,
        help="adapters.yaml (default: IW_REGISTRY or ./adapters.yaml)",
    )
    return parser


def _validate(path: Path | None) -> int:
    """`inference-wrapper validate`: the start-up registry checks, nothing else."""
    from registry.registry import AdapterRegistry  # noqa: PLC0415  (imports the adapter modules)

    target = path or Path(os.environ.get("IW_REGISTRY") or "adapters.yaml")
    try:
        registry = AdapterRegistry.from_file(target)
    except RegistryError as exc:
        print(f"inference-wrapper: invalid: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(  # noqa: T201
        f"{target}: valid ({len(registry.names)} adapters: {', '.join(registry.names)}; "
        f"{len(registry.presets)} presets)"
    )
    return 0


def _announce_admin_key(
    key: str, cache_dir: Path, *, tty: bool | None = None, terminal: IO[str] | None = None
) -> None:
    """Show a generated admin key on a terminal; elsewhere write it to a 0600 file."""
    if sys.stdout.isatty() if tty is None else tty:
        # the only place a key is ever shown: the operator needs it to call the control plane
        print(
            f"\nNo IW_ADMIN_KEY set: generated an admin key for this run:\n\n    {key}\n\n"
            "Send it as 'X-API-Key: <key>' to /v1/model/*. Set IW_ADMIN_KEY to choose your own.\n",
            file=terminal or sys.stderr,
            flush=True,
        )
        return
    # stdout is a log file or a pipe (a container, CI): a key there would outlive the run in
    # log stores, so it goes to a file only this user can read and the log says where
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "admin-key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already existed
        os.write(fd, key.encode() + b"\n")
    finally:
        os.close(fd)
    logger.warning(
        "IW_ADMIN_KEY is not set: generated an admin key for this run, written to %s (mode 0600)",
        path,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args.registry)
    try:
        settings = Settings.from_env(
            host=args.host,
            port=args.port,
            registry_path=args.registry,
            preload=args.preload,
            log_format=args.log_format,
        )
    except (SettingsError, TypeError, ValueError) as exc:
        print(f"inference-wrapper: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    # vLLM installs its own stdout handler (propagate off) unless told not to; its lines must
    # go through our masked handler like everyone else's
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    store = SecretStore(settings.max_secrets)
    for key, value in os.environ.items():
        if _SECRET_ENV.search(key):
            store.add(value)
    tty = sys.stdout.isatty()
    # JSON logs: whatever engines print to fd 1/2 is wrapped into JSON lines from here on
    stream = capture_output_as_json(store) if settings.log_format == "json" else None
    configure_logging(store, fmt=settings.log_format, level=settings.log_level, stream=stream)
    if not settings.admin_keys:
        generated = pysecrets.token_urlsafe(24)
        settings = evolve(settings, admin_keys=(generated,))
        store.add(generated)
        # on a terminal, straight to it (the capture would mask the key it has just learnt)
        _announce_admin_key(generated, settings.cache_dir, tty=tty, terminal=stream)
    if not settings.api_keys:
        logger.warning(
            "IW_API_KEY is not set: the data plane (/v1/chat/completions, /v1/models) is OPEN "
            "to anyone who can reach %s:%s",
            settings.host,
            settings.port,
        )
    from service.app import create_app  # noqa: PLC0415  (after logging is configured)

    try:
        app = create_app(settings, secrets=store)
    except RegistryError as exc:
        logger.error("cannot start: %s", exc)  # noqa: TRY400
        return 2

    import uvicorn  # noqa: PLC0415

    from service.http_limits import server_options  # noqa: PLC0415  (imports uvicorn)
    from service.server import WrapperServer  # noqa: PLC0415

    # the one place the uvicorn config is built
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        # the app drains before uvicorn closes anything (service/server.py): by the time this
        # applies, every response has ended; it only bounds a connection that would not close
        timeout_graceful_shutdown=_CLOSE_GRACE_S,
        **server_options(settings),  # header/body limits and timeouts, connection cap
    )
    server = WrapperServer(config, app, health_port=settings.health_port)
    server.run()
    if server.signals:
        # stopped by a signal, and everything is released: engine unloaded and reaped,
        # connections closed. The interpreter's own teardown would now garbage-collect an
        # engine's heap (torch, vLLM), measured at 7-10 s on 2 cores: past a pod's grace period
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
