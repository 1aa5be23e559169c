"""Is a model reachable? The dry-run check every engine adapter's `check()` makes before a load.

A load that cannot reach its model used to find out inside the engine: a hub id with no network
retried for most of a minute, and under `replace` the serving model was already gone by then.
This check answers in about a second, without loading anything:

- a local folder must be readable, and its `config.json`, when there is one, a JSON object;
- a hub id is fine when the Hugging Face cache holds it; else, with `HF_HUB_OFFLINE` set, it is
  refused at once; else the hub is asked once with a short timeout (found, gated, missing or
  unreachable each get their own message).

Must never: download anything, import an engine, retry, or wait longer than `HUB_TIMEOUT_S`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from schemas.errors import ParamsValidationError

#: seconds the one hub request may take (connect and read)
HUB_TIMEOUT_S = 1.5
#: largest config.json read for the check (real ones are a few KiB)
MAX_CONFIG_BYTES = 4 * 1024 * 1024
_CODE = "model_unreachable"


def _refuse(message: str) -> ParamsValidationError:
    return ParamsValidationError(message, param="$.model", code=_CODE)


def check_local_folder(path: Path) -> None:
    """A model folder the engine can read: listable, and a parseable config.json if present."""
    if not os.access(path, os.R_OK | os.X_OK):
        raise _refuse("the model folder is not readable by the service")
    config = path / "config.json"
    if not config.exists():
        return  # other layouts exist (GGUF files, mistral's params.json): the engine decides
    try:
        if config.stat().st_size > MAX_CONFIG_BYTES:
            raise _refuse("the model folder's config.json is too large to be a model config")
        data = json.loads(config.read_bytes())
    except OSError as exc:
        raise _refuse(f"the model folder's config.json cannot be read ({exc.strerror})") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _refuse(f"the model folder's config.json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _refuse("the model folder's config.json is not a JSON object")


def _offline(constants_say: bool) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return constants_say or env


def check_hub_model(repo_id: str) -> str:
    """Where a hub model will come from: "cache" or "hub"; 422 when from neither.

    The token is the one the load's env supplies (the manager applies it around `check()`).
    """
    import huggingface_hub  # noqa: PLC0415  (only hub ids need it; cheap, no engine)
    from huggingface_hub import errors as hub_errors  # noqa: PLC0415

    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return "cache"
    if _offline(bool(huggingface_hub.constants.HF_HUB_OFFLINE)):
        raise _refuse(
            f"model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except hub_errors.GatedRepoError as exc:
        raise _refuse(
            f"model '{repo_id}' is gated on the Hugging Face hub: load it with an HF_TOKEN "
            "that has access"
        ) from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise _refuse(
            f"model '{repo_id}' was not found on the Hugging Face hub (or it is private and "
            "the load gave no HF_TOKEN with access)"
        ) from exc
    except Exception as exc:
        # no network, DNS, proxy, timeout: the engine would retry for minutes, then fail
        raise _refuse(
            f"model '{repo_id}' is not in the local Hugging Face cache and the hub cannot be "
            f"reached ({type(exc).__name__}); pre-fetch it into the cache or restore access"
        ) from exc
    return "hub"


def check_reachable(kind: str, value: str) -> None:
    """The check for a parsed model reference (`kind` as `ModelRef.kind`); bundled passes."""
    if kind == "local":
        check_local_folder(Path(value))
    elif kind == "hub":
        check_hub_model(value)


__all__ = ["HUB_TIMEOUT_S", "check_hub_model", "check_local_folder", "check_reachable"]
