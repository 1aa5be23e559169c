"""Fake `sglang.srt` (the runtime package)."""
