"""Benchmarks that compare singlewriter with its peers in one run."""
