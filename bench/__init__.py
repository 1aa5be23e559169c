"""Benchmarks: scripts that print ratios and figures measured in one run."""
