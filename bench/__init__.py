"""Benchmarks: each script answers one question against its ceiling or peer in the same run."""
