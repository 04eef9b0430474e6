"""The knobs that both the compiler and the engine read, each with its one default.

A plan is compiled for the batch shapes the engine will run (CUDA-graph sizes, DeepEP's buffers,
the activation peak), so `compile` and `LLM` / `serve` must agree on them when the user says
nothing: every option dataclass and every flag takes its default from here."""

BLOCK_SIZE = 16  # tokens per KV block
MAX_NUM_SEQS = 256  # sequences stepped together; the largest decode batch a plan captures a graph for
MAX_NUM_BATCHED_TOKENS = 2048  # tokens per step (prefill chunks + decode rows)
MAX_PREFILL_CHUNK = 512  # prompt tokens one sequence may add to a step
GPU_MEMORY_UTILIZATION = 0.9  # share of the card's memory an engine may hold in all
MAX_MODEL_LEN = 4096  # prompt + output when the config gives no max_position_embeddings
DEEP_EP_MAX_TOKENS = 128  # tokens per rank DeepEP's low-latency buffers hold (0: normal mode only)
CPU_KV_CACHE_BYTES = 1 << 30  # the KV pool on CPU when neither num_blocks nor kv_cache_memory is given
MAX_IMAGES_PER_REQUEST = 8  # images one request may carry (vision-language plans)
IMAGE_CACHE_ENTRIES = 64  # encoded images kept by hash, least recently used dropped first
