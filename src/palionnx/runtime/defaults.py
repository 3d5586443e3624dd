"""Defaults shared by the API, the CLI, export and the benchmarks: each one is defined here only."""

DEFAULT_PROMPT = "caption en"
DEFAULT_MAX_NEW_TOKENS = 256  # the origin script's limit
# Images per decoder batch on the CPU: at 256 new tokens, pg1-3b-224 int4 captioned 1.7 / 2.0 / 2.3 / 2.8x the
# images per second of batch 1 at batch 4 / 8 / 16 / 32, with 2.2 GB more memory at 32 (AMD EPYC, 2 cores;
# benchmarks/results/cpu-batch-pg1-3b-224-int4.md). `palionnx caption` halves it where the memory is short.
DEFAULT_BATCH_SIZE = 32
# `palionnx serve`'s slots on the CPU: a server answers people, and every newcomer's prefill (2.4 s for the 3B
# model) pauses all slots; 8 slots gave 2.0x batch 1's images/s (same benchmark) with less memory.
DEFAULT_SERVE_CPU_SLOTS = 8
# On the CPU prompts are prefilled at most 4 at a time: per image as fast as one at a time (2027 / 2025 / 1970 /
# 2192 ms per image at 1 / 2 / 4 / 8 rows, pg1-3b-224 int4, AMD EPYC 2 cores), with the prefill's memory bounded.
CPU_PREFILL_ROWS = 4
DEFAULT_CUDA_BATCH_SIZE = 64  # on CUDA: images/s grows up to 64 rows (benchmarks/gpu_check.py), then falls
DEFAULT_BLOCK_SIZE = 32  # int8/int4 weights: values per quantization block along K
# int4 folders for CUDA: MatMulNBits at block 128 decoded 8 % faster than at 32 on an H200 (1.51 against 1.64 ms
# per token, pg1-3b-224; benchmarks/results/gpu-h200-pg1-3b-224.md), where the decoder's hidden size allows it.
CUDA_INT4_BLOCK_SIZE = 128
# On CUDA, batches of up to CUDA_SMALL_BATCH rows get a KV cache of at least CUDA_MIN_CACHE_SLOTS slots per
# row: GroupQueryAttention then splits a decode step over more of the GPU (int4 1.64 -> 1.50 ms per token,
# bf16 2.21 -> 2.05; fp16 and batch 8 unchanged; same benchmark).
CUDA_MIN_CACHE_SLOTS = 1024
CUDA_SMALL_BATCH = 8
