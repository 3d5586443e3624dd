"""Caption text from tokens: the streamed pieces (`TextDeltas`) always add up to the decoded caption."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palionnx.runtime.manifest import Manifest
from palionnx.runtime.text import TextCodec, TextDeltas


@pytest.fixture(scope="module")
def codec(numpy_folder):
    folder = numpy_folder("tiny-pg1")
    return TextCodec(folder, Manifest.load(folder))


def test_streamed_pieces_add_up_to_the_caption_whatever_the_tokens(codec):
    """Byte-fallback runs (a byte that came out alone can join the next, or become a replacement character),
    special tokens inside them and ids the tokenizer lacks: the pieces never need taking back."""
    vocab = codec.manifest.vocab_size
    tokens = st.one_of(st.integers(0, vocab - 1), st.sampled_from(sorted(codec.byte_ids)),
                       st.sampled_from(sorted(codec.special_ids)))

    @settings(max_examples=400, derandomize=True, deadline=None)
    @given(ids=st.lists(tokens, max_size=30))
    def check(ids):
        deltas = TextDeltas(codec)
        pieces = [deltas.add(token) for token in ids]
        text = codec.decode(ids)
        assert "".join(pieces) + deltas.finish(text) == text

    check()


def test_text_comes_out_as_soon_as_it_cannot_change(codec):
    word = codec.tokenizer.encode("hello", add_special_tokens=False).ids
    accent = codec.tokenizer.encode("é", add_special_tokens=False).ids  # two byte pieces in this vocabulary
    assert len(accent) == 2 and set(accent) <= codec.byte_ids
    deltas = TextDeltas(codec)
    assert "".join(deltas.add(t) for t in word) == codec.decode(word)
    assert deltas.add(accent[0]) == "" and deltas.add(accent[1]) == ""  # held: the run may go on
    assert deltas.add(word[0]) == codec.decode(word + accent + word[:1])[len(codec.decode(word)):]
    assert deltas.finish(codec.decode(word + accent + word[:1])) == ""
