"""Tools around the engine: the offline and serving benchmarks and the roofline they are measured against."""
