"""Fake `sglang.srt.entrypoints`."""
