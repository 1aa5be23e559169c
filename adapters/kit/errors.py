"""The one cleaner engine and upstream error text goes through before anyone sees it.

Order matters: masking after truncation lets a secret that straddles the cut through in part (a
client once received the first 15 characters of the operator's upstream key). So the text is
masked whole, local paths are replaced, and only then is it cut to one short line.

Must never: truncate before masking; return more than `limit` characters; raise (it runs while an
error is being reported).
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["ERROR_TEXT_LIMIT", "clean_error_text", "no_mask"]

#: characters of engine text a client may see in one error message
ERROR_TEXT_LIMIT = 300
#: engine text longer than this is cut before the path regex runs (bounded work), well after the
#: longest secret the store would hold could end: the mask has already run over the whole text
_SCAN_LIMIT = 64 * 1024
_PATH = re.compile(r"(?<![\w<])(?:[A-Za-z]:)?(?:/|~/)[^\s'\",)]*")


def no_mask(text: str) -> str:
    """The identity mask, for callers with no secrets to hide."""
    return text


def clean_error_text(
    text: str,
    mask: Callable[[str], str] = no_mask,
    *,
    limit: int = ERROR_TEXT_LIMIT,
    first_line: bool = True,
    paths: bool = True,
) -> str:
    """`text` masked, its local paths replaced, then cut to `limit` characters (… when cut).

    `first_line` keeps only the first non-empty line (tracebacks and pydantic summaries put the
    detail there); `paths` replaces absolute and home-relative paths with `<path>`.
    """
    text = mask(str(text))
    if first_line:
        text = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if paths:
        text = _PATH.sub("<path>", text[:_SCAN_LIMIT])
    if len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return text
