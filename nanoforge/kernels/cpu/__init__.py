"""The `cpu` provider: kernels for the CPU target where torch_ref's per-sequence loops and chains of
small ops cost more host time than compute; every function has the signature of its torch reference
(kernels/torch_ref.py) and falls back to it where its fast path does not apply."""
from .attention import attention
from .elementwise import add_rms_norm, qk_norm_rope, rms_norm, rope, silu_mul
from .linear import linear, lm_head, prepare_params

__all__ = ["attention", "add_rms_norm", "qk_norm_rope", "rms_norm", "rope", "silu_mul", "linear", "lm_head",
           "prepare_params"]
