"""The `triton` provider: Triton kernels for the ops where fusion or paging pays; every function
has the signature of its torch reference (kernels/torch_ref.py) and is CUDA-graph safe."""
from .attention import attention
from .elementwise import add_rms_norm, embed, qk_norm_rope, rms_norm, rope, silu_mul
from .gemv import linear
from .moe import grouped_experts, moe
from .sampling import sample_tokens

__all__ = ["add_rms_norm", "attention", "embed", "grouped_experts", "linear", "moe", "qk_norm_rope", "rms_norm", "rope", "sample_tokens", "silu_mul"]
