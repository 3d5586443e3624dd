"""The decode loop on its own, in mlx-lm's style: tiny arrays, hand-computed answers, a numpy fake decoder."""

import numpy as np
import pytest

from palionnx.runtime.generate import (
    generate_step,
    greedy,
    make_logits_processors,
    make_sampler,
    next_tokens,
    reads_logits,
)
from palionnx.runtime.prompt import PromptBatch, lay_out

VOCAB = 11


def test_greedy_sampler_picks_the_argmax():
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]], dtype=np.float32)
    assert make_sampler(0.0)(logits).tolist() == [1, 0]
    assert greedy(logits).dtype == np.int64


def test_top_k_1_samples_the_argmax_at_any_temperature():
    logits = np.array([[0.0, 0.2, 0.1], [1.0, 0.0, 0.9]], dtype=np.float32)
    sampler = make_sampler(5.0, top_k=1, seed=0)
    for _ in range(20):
        assert sampler(logits).tolist() == [1, 0]


def test_top_p_keeps_the_smallest_set_above_p():
    # probabilities 0.5, 0.3, 0.2: the tail of mass <= 1 - 0.6 = 0.4 is token 2 alone, so it is never drawn.
    logits = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    sampler = make_sampler(1.0, top_p=0.6, seed=1)
    draws = {int(sampler(logits)[0]) for _ in range(200)}
    assert draws == {0, 1}


def test_seeded_samplers_repeat_their_draws():
    logits = np.zeros((3, VOCAB), dtype=np.float32)
    first, second = make_sampler(1.0, seed=4), make_sampler(1.0, seed=4)
    assert [first(logits).tolist() for _ in range(5)] == [second(logits).tolist() for _ in range(5)]


def test_repetition_penalty_by_hand():
    (penalty,) = make_logits_processors(repetition_penalty=2.0)
    logits = np.array([[2.0, -2.0, 1.0]], dtype=np.float32)
    history = np.array([[0, 1, 1]])
    assert penalty(history, logits).tolist() == [[1.0, -4.0, 1.0]]  # seen: positive halved, negative doubled


def test_no_repeat_ngram_by_hand():
    (ban,) = make_logits_processors(no_repeat_ngram_size=2)
    history = np.array([[5, 6, 5], [1, 2, 3]])
    out = ban(history, np.zeros((2, 8), dtype=np.float32))
    assert np.isinf(out[0, 6]) and np.isfinite(np.delete(out[0], 6)).all()  # "5 6" already seen after 5
    assert np.isfinite(out[1]).all()  # prefix 3 never seen before


def test_default_settings_make_no_processors():
    assert make_logits_processors() == [] and make_logits_processors(1.0, 0) == []


def test_when_the_loop_reads_logits():
    assert not reads_logits(greedy, [])
    assert not reads_logits(make_sampler(0.0), [])
    assert reads_logits(greedy, make_logits_processors(repetition_penalty=1.2))
    assert reads_logits(make_sampler(0.7, seed=0), [])


class FakeOutput:
    def __init__(self, logits: np.ndarray, calls: dict):
        self._logits, self.calls = logits, calls

    def logits(self) -> np.ndarray:
        self.calls["logits"] += 1
        return self._logits

    def next_token(self) -> np.ndarray:
        self.calls["next_token"] += 1
        return self._logits.argmax(-1)


class FakeDecoder:
    """A numpy 'model' with a per-row KV 'cache': the next token depends on the row's whole cached sequence
    (padding excluded), so rows mixed up, or padding counted, change what comes next."""

    def __init__(self) -> None:
        self.cache: list[list[int]] = []
        self.calls = {"logits": 0, "next_token": 0, "steps": 0}

    def _output(self) -> FakeOutput:
        logits = np.zeros((len(self.cache), VOCAB), dtype=np.float32)
        for row, tokens in enumerate(self.cache):
            logits[row, next_token(tokens)] = 1.0
        return FakeOutput(logits, self.calls)

    def prefill(self, prompt: PromptBatch) -> FakeOutput:
        self.cache = [ids[:n].tolist() for ids, n in zip(prompt.input_ids, prompt.lengths)]
        return self._output()

    def step(self, token_ids: np.ndarray) -> FakeOutput:
        assert len(token_ids) == len(self.cache), "every row stays in the batch"
        self.calls["steps"] += 1
        for tokens, token in zip(self.cache, token_ids.tolist()):
            tokens.append(token)
        return self._output()


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) + 3 * len(tokens)) % VOCAB


def alone(prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """What one sequence generates on its own, without the loop."""
    tokens, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = next_token(tokens)
        out.append(token)
        if token == eos:
            break
        tokens.append(token)
    return out


def prompt_batch(prompts: list[list[int]]) -> PromptBatch:
    """Left-padded history (as transformers sees it) and right-padded decoder ids."""
    width = max(map(len, prompts))
    history = np.zeros((len(prompts), width), dtype=np.int64)
    right = np.zeros_like(history)
    for row, prompt in enumerate(prompts):
        history[row, width - len(prompt):] = prompt
        right[row, : len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts])
    return PromptBatch(history, right, np.zeros((*right.shape, 4), dtype=np.float32), lengths)


def run(prompts: list[list[int]], max_new_tokens: int, eos: int, **kwargs) -> tuple[list[list[int]], FakeDecoder]:
    decoder = FakeDecoder()
    generated: list[list[int]] = [[] for _ in prompts]
    for rows, tokens in generate_step(decoder, prompt_batch(prompts), max_new_tokens=max_new_tokens,
                                      eos_ids=[eos], **kwargs):
        assert len(rows) == len(tokens)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            generated[row].append(token)
    return generated, decoder


PROMPTS = [[4, 1], [2, 7, 9, 3, 5], [8], [6, 6, 1]]


@pytest.mark.parametrize("eos", [0, 3, 5])
def test_batch_of_different_lengths_equals_each_sequence_alone(eos):
    generated, decoder = run(PROMPTS, max_new_tokens=12, eos=eos)
    expected = [alone(p, 12, eos) for p in PROMPTS]
    assert generated == expected
    lengths = {len(e) for e in expected}
    assert len(lengths) > 1, "the test should make rows finish at different steps"
    assert decoder.calls["steps"] == max(lengths) - 1  # the batch ran until its longest row ended


def test_rows_leave_the_batch_at_eos():
    eos = 5
    expected = [alone(p, 12, eos) for p in PROMPTS]
    decoder = FakeDecoder()
    seen_rows = [rows.tolist() for rows, _ in generate_step(decoder, prompt_batch(PROMPTS), max_new_tokens=12,
                                                            eos_ids=[eos])]
    for step, rows in enumerate(seen_rows):
        assert rows == [r for r, e in enumerate(expected) if len(e) > step]


def test_greedy_reads_only_next_token_and_processors_read_logits():
    _, decoder = run(PROMPTS, max_new_tokens=6, eos=99)
    assert decoder.calls["logits"] == 0 and decoder.calls["next_token"] == 6
    history: list[np.ndarray] = []

    def spy(h: np.ndarray, logits: np.ndarray) -> np.ndarray:
        history.append(h.copy())
        return logits

    generated, decoder = run(PROMPTS, max_new_tokens=6, eos=99, logits_processors=[spy])
    assert decoder.calls["next_token"] == 0 and decoder.calls["logits"] == 6
    assert generated == [alone(p, 6, 99) for p in PROMPTS]
    np.testing.assert_array_equal(history[0], prompt_batch(PROMPTS).ids)  # processors see the left-padded prompt
    assert history[1].shape == (4, history[0].shape[1] + 1)
    assert history[1][:, -1].tolist() == [g[0] for g in generated]


def test_max_new_tokens_bounds_every_row():
    generated, _ = run(PROMPTS, max_new_tokens=3, eos=99)
    assert [len(g) for g in generated] == [3, 3, 3, 3]


class CountingOutput:
    """A decoder output that counts what the sampling step reads back."""

    def __init__(self, logits: np.ndarray, argmax: np.ndarray):
        self._logits, self._argmax, self.reads = logits, argmax, []

    def logits(self) -> np.ndarray:
        self.reads.append("logits")
        return self._logits

    def next_token(self) -> np.ndarray:
        self.reads.append("next_token")
        return self._argmax


def test_next_tokens_reads_the_logits_only_when_something_rewrites_or_samples_them():
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 2.9]], dtype=np.float32)
    plain = CountingOutput(logits, np.array([7, 7]))  # the graph's argmax, deliberately not the logits' one
    assert next_tokens(plain, np.zeros((2, 1), dtype=np.int64)).tolist() == [7, 7]
    assert plain.reads == ["next_token"]
    penalised = CountingOutput(logits, np.array([7, 7]))
    history = np.array([[1], [0]])  # row 0 has seen token 1, row 1 token 0
    tokens = next_tokens(penalised, history, greedy, make_logits_processors(repetition_penalty=10.0))
    assert tokens.tolist() == [2, 2] and penalised.reads == ["logits"]


def test_lay_out_places_image_features_and_keeps_each_rows_history():
    image = 9
    sequences = [[image, image, 2, 5, 6], [image, image, 2, 5]]
    batch = lay_out(sequences, features := object(), pad_id=0, image_token_id=image, image_tokens=2)
    assert batch.image_features is features and batch.lengths.tolist() == [5, 4]
    assert batch.input_ids.tolist() == [[-1, -2, 2, 5, 6], [-3, -4, 2, 5, 0]]  # right-padded, feature rows
    assert batch.ids.tolist() == [[9, 9, 2, 5, 6], [0, 9, 9, 2, 5]]  # left-padded
    assert [batch.history(row).tolist() for row in range(2)] == sequences
    with pytest.raises(ValueError, match="gives 1 image tokens"):
        lay_out([[image, 2]], None, pad_id=0, image_token_id=image, image_tokens=2)
