"""GPU benchmarks and tuning sweeps of nanoforge/kernels, kept out of the kernel modules:
attention, elementwise, gemv, moe, sampling (Triton kernels) and libs (library adapters).
Import from the repo root as bench.kernels.<name> (bench/gpu_check.sh sets PYTHONPATH=$PWD)."""
