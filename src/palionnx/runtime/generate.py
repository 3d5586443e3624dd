"""The decode loop: samplers, logits processors and `generate_step`.

Shaped like mlx-lm: `generate_step` is a plain generator that takes a `sampler` and a list of
`logits_processors`, small pure functions built by `make_sampler` and `make_logits_processors`.
Processors and samplers follow transformers' semantics (the tests check them against transformers'
own classes on the same logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from .prompt import PromptBatch

Sampler = Callable[[np.ndarray], np.ndarray]  # logits [b, vocab] -> token ids [b]
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (history [b, t], logits) -> logits


class Greedy:
    """The highest-scoring token of each row. The decoder graph computes the same argmax itself
    (`next_token`), so a loop with this sampler and no logits processors never reads the logits."""

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return logits.argmax(axis=-1).astype(np.int64)


greedy = Greedy()


TEMPERATURE = (0.01, 2.0)  # sampling temperatures allowed (0 is greedy); below, logits / t overflow float32
REPETITION_PENALTY = (0.01, 10.0)  # 1 is off


class SettingError(ValueError):
    """A generation setting out of range or given where it cannot act; the message names it."""


def check_settings(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                   repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                   spell: Callable[[str], str] = str) -> None:
    """The one check of generation settings, for the CLI's options and the server's fields alike (`spell`
    names a setting as the caller's user knows it, e.g. "--top-k"): finite numbers in range, and sampling
    options only with a temperature (given alone they would be ignored: refused instead)."""
    def bad(name: str, rule: str, value: object) -> SettingError:
        return SettingError(f"{spell(name)} must be {rule}, got {value}")

    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if not math.isfinite(value):
            raise bad(name, "a finite number", value)
    if temperature != 0 and not TEMPERATURE[0] <= temperature <= TEMPERATURE[1]:
        raise bad("temperature", f"0 (greedy) or between {TEMPERATURE[0]:g} and {TEMPERATURE[1]:g}", temperature)
    if not 0.0 <= top_p <= 1.0:
        raise bad("top_p", "between 0 and 1", top_p)
    if not REPETITION_PENALTY[0] <= repetition_penalty <= REPETITION_PENALTY[1]:
        raise bad("repetition_penalty", f"between {REPETITION_PENALTY[0]:g} and {REPETITION_PENALTY[1]:g} (1 = off)",
                  repetition_penalty)
    for name, count in (("top_k", top_k), ("no_repeat_ngram_size", no_repeat_ngram_size)):
        if count < 0:
            raise bad(name, "0 or more", count)
    if seed is not None and not 0 <= seed < 2**63:
        raise bad("seed", "between 0 and 2^63 - 1", seed)
    if temperature > 0:
        return
    ignored = [spell(name) for name, active in (("top_k", top_k != 0), ("top_p", top_p != 1.0),
                                                ("seed", seed is not None)) if active]
    if ignored:
        raise SettingError(f"{', '.join(ignored)} only act when sampling: add {spell('temperature')} (e.g. 0.7), or "
                           f"drop {'them' if len(ignored) > 1 else 'it'} for greedy captions")


def make_sampler(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
) -> Sampler:
    """Greedy when temperature is 0; otherwise temperature, then top-k, then top-p, then a draw.

    The draw uses numpy's generator seeded with `seed`, so a seed makes sampling reproducible.
    """
    if temperature <= 0:
        return greedy
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> np.ndarray:
        scores = logits.astype(np.float32) / np.float32(temperature)
        if top_k > 0:
            scores = _top_k(scores, top_k)
        if top_p < 1.0:
            scores = _top_p(scores, top_p)
        probs = _softmax(scores)
        # Inverse-CDF draw per row: one uniform number per sequence.
        cdf = np.cumsum(probs, axis=-1)
        u = rng.random((probs.shape[0], 1), dtype=np.float64) * cdf[:, -1:]
        return np.minimum((cdf < u).sum(axis=-1), probs.shape[1] - 1).astype(np.int64)

    return sample


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
    return np.where(scores < kth, -np.inf, scores)


def _top_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter as transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - p."""
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(_softmax(sorted_scores), axis=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False  # keep at least one token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def make_logits_processors(
    repetition_penalty: float | None = None, no_repeat_ngram_size: int = 0
) -> list[LogitsProcessor]:
    """Processors for the given settings (none for the defaults)."""
    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(_repetition_penalty(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(_no_repeat_ngram(no_repeat_ngram_size))
    return processors


def _repetition_penalty(penalty: float) -> LogitsProcessor:
    """Every token already in the history: divide a positive score, multiply a negative one."""

    def process(history: np.ndarray, logits: np.ndarray) -> np.ndarray:
        out = logits.copy()
        for row in range(out.shape[0]):
            seen = np.unique(history[row])
            score = out[row, seen]
            out[row, seen] = np.where(score < 0, score * penalty, score / penalty)
        return out

    return process


def _no_repeat_ngram(n: int) -> LogitsProcessor:
    """Ban any token that would repeat an n-gram already in the history."""

    def process(history: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if history.shape[1] + 1 < n:
            return logits
        out = logits.copy()
        for row in range(out.shape[0]):
            tokens = history[row].tolist()
            prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
            banned = [
                tokens[i + n - 1]
                for i in range(len(tokens) - n + 1)
                if tuple(tokens[i : i + n - 1]) == prefix
            ]
            out[row, banned] = -np.inf
        return out

    return process


def reads_logits(sampler: Sampler, logits_processors: Sequence[LogitsProcessor]) -> bool:
    """Whether the decode loop must fetch the logits from the decoder.

    It need not when the sampler is a `Greedy` (the graph's own `next_token` is the same argmax) and no
    processor rewrites the logits: then each step reads back 8 bytes per sequence instead of the vocabulary.
    """
    return not isinstance(sampler, Greedy) or bool(logits_processors)


class DecoderOutput(Protocol):
    """What one decoder call gives back (implemented by `palionnx.runtime.model.StepOutput`)."""

    def logits(self) -> np.ndarray: ...

    def next_token(self) -> np.ndarray: ...


def next_tokens(output: DecoderOutput, history: np.ndarray, sampler: Sampler = greedy,
                logits_processors: Sequence[LogitsProcessor] = ()) -> np.ndarray:
    """One sampling step: the next token [b] of each row of `output`. The processors rewrite the logits in
    order (seeing `history` [b, t], the ids so far), then the sampler picks; when neither needs the logits
    (`reads_logits`) the graph's own argmax is read instead."""
    if not reads_logits(sampler, logits_processors):
        return output.next_token()
    logits = output.logits()
    for process in logits_processors:
        logits = process(history, logits)
    return sampler(logits)


class KVDecoder(Protocol):
    """One batch's decoder with its KV cache (implemented by `palionnx.runtime.model.DecoderState`)."""

    def prefill(self, prompt: PromptBatch) -> DecoderOutput: ...

    def step(self, token_ids: np.ndarray) -> DecoderOutput: ...


def generate_step(
    decoder: KVDecoder,
    prompt: PromptBatch,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    sampler: Sampler = greedy,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Prefill once, then feed one token per row per step; yield (rows, tokens) for the sequences still running.

    - `decoder`: a fresh KV cache with room for the prompt and `max_new_tokens` more slots per row.
    - `prompt`: the batch's prompts; its `ids` start the history the processors see.
    - `max_new_tokens`: at most this many tokens per sequence (required; at least 1).
    - `eos_ids`: token ids that end a sequence (default none: always `max_new_tokens`). The eos token is
      yielded, then the row is done.
    - `sampler`: picks one token per row from the processed logits (default `greedy`).
    - `logits_processors`: applied in order to the logits before sampling (default none).

    `rows` index the batch. A finished row stays in the decoder's batch until the batch ends (its tokens
    are no longer yielded): the batch keeps one shape, which a captured CUDA graph needs, and a decode step
    reads the weights once whatever the number of rows. See `reads_logits` for when the logits are never
    fetched.
    """
    history = prompt.ids
    eos = np.asarray(list(eos_ids), dtype=np.int64)
    running = np.ones(len(history), dtype=bool)
    output = decoder.prefill(prompt)
    for step in range(max_new_tokens):
        tokens = next_tokens(output, history, sampler, logits_processors)
        rows = np.flatnonzero(running)
        yield rows, tokens[rows]
        running &= ~np.isin(tokens, eos)
        if step + 1 == max_new_tokens or not running.any():
            return
        if logits_processors:  # only they read the history
            history = np.concatenate([history, tokens[:, None]], axis=1)
        output = decoder.step(tokens)
