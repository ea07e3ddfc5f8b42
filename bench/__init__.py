"""Benchmarks: not tests. Each script prints its figures and writes them to bench/results/."""
