"""Benchmarks and measuring tools for fa3py, run from the repository (the wheel does not ship
them): `python -m benchmarks.run --help`; benchmarks/README.md lists the tools."""
