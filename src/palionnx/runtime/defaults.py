"""Defaults shared by the API, the CLI, export and the benchmarks: each one is defined here only."""

DEFAULT_PROMPT = "caption en"
DEFAULT_MAX_NEW_TOKENS = 256  # the origin script's limit
DEFAULT_BATCH_SIZE = 4  # images per decoder batch on the CPU (a CPU decode step costs the same at 1 and 4 rows)
DEFAULT_CUDA_BATCH_SIZE = 64  # on CUDA: images/s grows up to 64 rows (benchmarks/gpu_check.py), then falls
DEFAULT_BLOCK_SIZE = 32  # int8/int4 weights: values per quantization block along K
CUDA_MIN_CACHE_SLOTS = 0  # KV-cache slots per row at least, for batches up to CUDA_SMALL_BATCH on CUDA
CUDA_SMALL_BATCH = 8
