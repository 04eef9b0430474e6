"""The knobs that both the compiler and the engine read, each with its one default.

A plan is compiled for the batch shapes the engine will run (CUDA-graph sizes, DeepEP's buffers,
the activation peak), so `compile` and `LLM` / `serve` must agree on them when the user says
nothing: every option dataclass and every flag takes its default from here."""

BLOCK_SIZE = 16  # tokens per KV block
MAX_NUM_SEQS = 256  # sequences stepped together; the largest decode batch a plan captures a graph for
MAX_NUM_BATCHED_TOKENS = 2048  # tokens per step (prefill chunks + decode rows): CPU, GPUs under BIG_GPU_BYTES
MAX_PREFILL_CHUNK = 512  # prompt tokens one sequence may add to a step (there)
BIG_GPU_BYTES = 70 << 30  # from this much memory (H100, H200) a card runs BIG_GPU_BATCHED_TOKENS a step
BIG_GPU_BATCHED_TOKENS = 8192  # and a sequence may fill the step: the H100 offline runs' setting (README)
GPU_MEMORY_UTILIZATION = 0.9  # share of the card's memory an engine may hold in all
MAX_MODEL_LEN = 4096  # prompt + output when the config gives no max_position_embeddings
DEEP_EP_MAX_TOKENS = 128  # tokens per rank DeepEP's low-latency buffers hold (0: normal mode only)
CPU_KV_CACHE_BYTES = 1 << 30  # the KV pool on CPU when neither num_blocks nor kv_cache_memory is given
MAX_IMAGES_PER_REQUEST = 8  # images one request may carry (vision-language plans)
IMAGE_CACHE_ENTRIES = 64  # encoded images kept by hash, least recently used dropped first


def step_tokens(device: str, card_bytes: int = 0) -> tuple[int, int]:
    """(max_num_batched_tokens, max_prefill_chunk) when the user gives neither: a big card's
    mixed steps run near the GEMMs' peak only at thousands of tokens (and 4x fewer steps cost 4x
    less host time), where a CPU or a small card keeps its memory for the KV cache."""
    if device.startswith("cuda") and card_bytes >= BIG_GPU_BYTES:
        return BIG_GPU_BATCHED_TOKENS, BIG_GPU_BATCHED_TOKENS
    return MAX_NUM_BATCHED_TOKENS, MAX_PREFILL_CHUNK
