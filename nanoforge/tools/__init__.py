"""Tools around the engine: random-weight checkpoints and benchmarks."""
