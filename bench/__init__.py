"""Benchmarks, run by `make bench`: each figure printed beside its baseline from the same run."""
