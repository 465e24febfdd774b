"""Benchmarks that print ratios against a named baseline (run as commands, not tests)."""
