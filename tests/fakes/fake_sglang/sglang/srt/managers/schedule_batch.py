"""Fake finish reasons: copies of sglang 0.5.23 `managers/schedule_batch.py` lines 279-345."""

from __future__ import annotations

from typing import Any


class BaseFinishReason:
    """schedule_batch.py:279."""

    def to_json(self) -> dict[str, Any]:
        """Wire shape sent from the scheduler to the tokenizer manager."""
        raise NotImplementedError


class FINISH_MATCHED_TOKEN(BaseFinishReason):  # noqa: N801  (the real name)
    """schedule_batch.py:284: EOS or a stop token id."""

    def __init__(self, matched: int | list[int]) -> None:
        self.matched = matched

    def to_json(self) -> dict[str, Any]:
        """schedule_batch.py:289-293."""
        return {"type": "stop", "matched": self.matched}


class FINISH_MATCHED_STR(BaseFinishReason):  # noqa: N801  (the real name)
    """schedule_batch.py:296: a stop string."""

    def __init__(self, matched: str) -> None:
        self.matched = matched

    def to_json(self) -> dict[str, Any]:
        """schedule_batch.py:301-305."""
        return {"type": "stop", "matched": self.matched}


class FINISH_LENGTH(BaseFinishReason):  # noqa: N801  (the real name)
    """schedule_batch.py:320: max_new_tokens reached."""

    def __init__(self, length: int) -> None:
        self.length = length

    def to_json(self) -> dict[str, Any]:
        """schedule_batch.py:325-329."""
        return {"type": "length", "length": self.length}


class FINISH_ABORT(BaseFinishReason):  # noqa: N801  (the real name)
    """schedule_batch.py:332: aborted; a status code means an error, none a plain abort."""

    def __init__(
        self,
        message: str | None = None,
        status_code: int | None = None,
        err_type: str | None = None,
    ) -> None:
        self.message = message or "Aborted"
        self.status_code = status_code
        self.err_type = err_type

    def to_json(self) -> dict[str, Any]:
        """schedule_batch.py:339-345."""
        return {
            "type": "abort",
            "message": self.message,
            "status_code": self.status_code,
            "err_type": self.err_type,
        }
