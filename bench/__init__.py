"""The benchmarks, each run from the project root as `python -m bench.<name>` (bench/README.md)."""
