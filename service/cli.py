"""`inference-wrapper serve`: settings from IW_* and flags, logging, the app, uvicorn.

Must never: print a key except the one admin key it generated itself, once, to the terminal.
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

from attrs import evolve

from registry.config import RegistryError
from registry.secrets import SecretStore
from service.logs import configure_logging
from service.settings import Settings, SettingsError

logger = logging.getLogger("inference_wrapper")

#: what uvicorn gives connections to close after the app's own drain (service/server.py)
_CLOSE_GRACE_S = 3

#: environment variables whose values are treated as secrets from the start
_SECRET_ENV = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inference-wrapper", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--host", help="bind address (IW_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (IW_PORT, default 8000)")
    serve.add_argument("--registry", type=Path, help="adapters.yaml (IW_REGISTRY)")
    serve.add_argument("--preload", help="preset to load at start-up (IW_PRELOAD)")
    serve.add_argument("--log-format", choices=["json", "text"], help="IW_LOG_FORMAT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = _parser().parse_args(argv)
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
    configure_logging(store, fmt=settings.log_format, level=settings.log_level)
    if not settings.admin_keys:
        generated = pysecrets.token_urlsafe(24)
        settings = evolve(settings, admin_keys=(generated,))
        # the only place a key is ever shown: the operator needs it to call the control plane
        print(  # noqa: T201
            f"\nNo IW_ADMIN_KEY set: generated an admin key for this run:\n\n    {generated}\n\n"
            "Send it as 'X-API-Key: <key>' to /v1/model/*. Set IW_ADMIN_KEY to choose your own.\n",
            file=sys.stderr,
            flush=True,
        )
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
