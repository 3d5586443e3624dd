"""What one caption request may ask of a model: plain-text prompts, the model's context, and memory.

The checks run before anything is allocated, so an impossible request is one clear error instead of a
multi-GB allocation that crashes: `check_request` raises RequestError with the limit in the message.
"""

from __future__ import annotations

from collections.abc import Sequence

from .defaults import CUDA_SMALL_BATCH
from .manifest import Manifest
from .text import TextCodec

GB = 1e9
# Prefill holds the attention scores of one layer at a time: [batch, heads, prompt, prompt] float32 in
# GroupQueryAttention. Measured on tiny-pg1 fp32, batch 4 (peak RSS above a short-prompt run): 2501-token
# prompts took 0.44 GB, 5005 tokens 1.68 GB, 8005 tokens 4.17 GB, about 1.0 copy; 1.5 leaves room for the
# allocator's slack. --max-memory overrides the limit.
ATTENTION_COPIES = 1.5
# The vision encoder's attention scores over every patch, [images, VISION_HEADS, tokens, tokens] float32, kept
# in its own session's arena: at 896 px (4096 image tokens) pg2-3b-896's vision encoder grew RSS by 1.58 GB for
# one image, 1.5 copies (benchmarks/results/big-pg2-3b-896.md). SigLIP-So400m, every PaliGemma's, has 16 heads.
VISION_HEADS = 16
# Prefill activations per prompt token: the MLP's gate, up and product at up to 8 x hidden (Gemma 2B's
# ratio), float32.
MLP_WIDTH, MLP_COPIES = 8, 3


class RequestError(ValueError):
    """A caption request that this model cannot serve; the message names the limit."""


def cache_length(m: Manifest, batch: int, max_len: int, min_slots: int = 0) -> int:
    """Slots per row of the KV cache the runtime allocates for `max_len` tokens: batches of up to
    CUDA_SMALL_BATCH rows get at least `min_slots` (CUDA's floor, runtime/defaults.py; 0 on the CPU), never
    beyond the model's context."""
    if batch > CUDA_SMALL_BATCH:
        return max_len
    return min(max(max_len, min_slots), m.max_positions)


def kv_cache_bytes(m: Manifest, batch: int, max_len: int) -> int:
    """The decoder's preallocated KV cache (keys and values of every layer) for `batch` rows of `max_len`."""
    element = 4 if m.kv_dtype == "float32" else 2
    return m.layers * 2 * batch * m.kv_heads * max_len * m.head_dim * element


def prefill_bytes(m: Manifest, batch: int, prompt_len: int) -> int:
    """Transient memory of the prefill of `batch` prompts at once: their images' vision encoder, attention over
    the whole prompt (prompt x prompt scores: the cache's free slots are not attended) and the MLP
    activations."""
    attention = int(ATTENTION_COPIES * batch * m.heads * prompt_len * prompt_len * 4)
    mlp = MLP_COPIES * batch * prompt_len * MLP_WIDTH * m.hidden * 4
    vision = int(ATTENTION_COPIES * batch * VISION_HEADS * m.image_seq_length**2 * 4)
    return attention + mlp + vision


def request_bytes(m: Manifest, batch: int, prompt_len: int, max_new_tokens: int, min_cache_slots: int = 0,
                  prefill_rows: int = 0) -> int:
    """Memory a batch needs beyond the loaded weights (an estimate: see the constants above), with the cache
    as long as `cache_length` makes it and prompts prefilled `prefill_rows` at a time (0: all at once; the
    model's `OnnxPaliGemma.prefill_chunk`)."""
    max_len = prompt_len + max_new_tokens
    cache = kv_cache_bytes(m, batch, cache_length(m, batch, max_len, min_cache_slots))
    return cache + prefill_bytes(m, min(batch, prefill_rows or batch), prompt_len)


def check_request(m: Manifest, codec: TextCodec, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                  memory_limit: float | None = None, min_cache_slots: int = 0, prefill_rows: int = 0) -> int:
    """Refuse prompts with special-token text, requests beyond the model's context and, with
    `memory_limit` (bytes), requests whose estimated memory exceeds it (`min_cache_slots`: the model's cache
    floor, `OnnxPaliGemma.min_cache_slots`; `prefill_rows`: its `prefill_chunk`). Returns the longest
    prompt's length in tokens."""
    longest = 0
    for prompt in set(prompts):
        special = codec.special_tokens_in(prompt)
        if special == ["<unk>"] * len(special) and special:
            unknown = codec.unknown_characters(prompt)
            raise RequestError(f"this model's tokenizer has no pieces for {''.join(unknown)!r} in the prompt "
                               "(they would all read as <unk>): write the prompt without them")
        if special:
            raise RequestError(f"the prompt contains the special token {special[0]}: prompts are plain text "
                               "(palionnx adds the image tokens and <bos> itself)")
        ids = codec.prompt_ids(prompt)
        if ids.count(m.image_token_id) != m.image_seq_length:
            raise RequestError(f"the prompt's text encodes to the image token (id {m.image_token_id}): "
                               "the model folder's image_token_id does not fit its tokenizer; export it again")
        longest = max(longest, len(ids))
    room = m.max_positions - longest
    if room < 1:
        raise RequestError(f"the prompt takes {longest} tokens (with the image's {m.image_seq_length}), more than "
                           f"the model's context of {m.max_positions} tokens: shorten it")
    if max_new_tokens > room:
        raise RequestError(f"{max_new_tokens} new tokens after a {longest}-token prompt exceed the model's context "
                           f"of {m.max_positions} tokens: at most {room} new tokens with this prompt")
    if memory_limit is not None:
        _check_memory(m, batch_size, longest, max_new_tokens, memory_limit, min_cache_slots, prefill_rows)
    return longest


def _check_memory(m: Manifest, batch: int, prompt_len: int, max_new_tokens: int, limit: float,
                  min_cache_slots: int, prefill_rows: int) -> None:
    need = request_bytes(m, batch, prompt_len, max_new_tokens, min_cache_slots, prefill_rows)
    if need <= limit:
        return
    cache = kv_cache_bytes(m, batch, cache_length(m, batch, prompt_len + max_new_tokens, min_cache_slots))
    raise RequestError(
        f"this request needs about {_size(need)} (KV cache {_size(cache)}, prefill of a {prompt_len}-token "
        f"prompt {_size(need - cache)}, batch {batch}) but {_size(limit)} is available: shorten the prompt, "
        "lower --batch-size or --max-new-tokens, or raise --max-memory"
    )


def _size(count: float) -> str:
    return f"{count / GB:.1f} GB" if count >= 0.1 * GB else f"{count / 1e6:.1f} MB"
