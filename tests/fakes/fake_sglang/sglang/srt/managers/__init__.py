"""Fake `sglang.srt.managers`."""
