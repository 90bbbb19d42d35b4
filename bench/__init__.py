"""Benchmarks (not tests): each prints its figures, its baseline measured in the same run, and the ratio."""
