"""Benchmarks: each compares gradsmith with its anchor in the same run."""
