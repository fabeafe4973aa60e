"""Benchmarks for fa3py against its peers: `python -m benchmarks.run --help`."""
