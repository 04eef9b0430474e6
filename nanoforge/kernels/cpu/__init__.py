"""The `cpu` provider: kernels for the CPU target where torch_ref's per-sequence loops cost more host
time than compute; every function has the signature of its torch reference (kernels/torch_ref.py)."""
from .attention import attention

__all__ = ["attention"]
