"""The `triton` provider: Triton kernels for the ops where fusion or paging pays; every function
has the signature of its torch reference (kernels/torch_ref.py) and is CUDA-graph safe in decode-only
batches, the ones captured (gdn's mixed steps build row lists on the host)."""
from .attention import attention
from .dsa import indexer, sparse_mla
from .elementwise import add_rms_norm, embed, qk_norm_rope, qk_rope_store, rms_norm, rope, silu_mul
from .gdn_decode import gdn
from .gemv import linear
from .moe import grouped_experts, moe
from .sampling import sample_tokens

__all__ = ["add_rms_norm", "attention", "embed", "gdn", "grouped_experts", "indexer", "linear", "moe", "qk_norm_rope",
           "qk_rope_store", "rms_norm", "rope", "sample_tokens", "silu_mul", "sparse_mla"]
