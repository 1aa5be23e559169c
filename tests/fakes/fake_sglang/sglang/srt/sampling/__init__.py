"""Fake `sglang.srt.sampling`."""
