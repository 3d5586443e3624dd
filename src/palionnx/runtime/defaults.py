"""Defaults shared by the API, the CLI, export and the benchmarks: each one is defined here only."""

DEFAULT_PROMPT = "caption en"
DEFAULT_MAX_NEW_TOKENS = 256  # the origin script's limit
DEFAULT_BATCH_SIZE = 4  # images per decoder batch
DEFAULT_BLOCK_SIZE = 32  # int8/int4 weights: values per quantization block along K
