"""Parallelism shared by passes, loader and runtime: shard specs, collectives, simulated ranks."""
