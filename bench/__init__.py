"""Benchmark scripts (run as `python3 bench/x.py`) and, under bench/kernels, the kernel benchmarks
and tuning sweeps (import as `bench.kernels.<name>` from the repo root). Not part of the package."""
