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


def test_detection_and_segmentation_tokens_come_back_in_the_caption(numpy_folder):
    """A mix checkpoint answers `detect cat` with <locNNNN> and `segment cat` with <segNNN> tokens: they are not
    special tokens, so the caption keeps them as transformers' decode(skip_special_tokens=True) does (the
    tokenizer.json's decode is checked against transformers' in test_export.py); streamed deltas too."""
    import numpy as np

    from palionnx import Captioner
    from palionnx.samples import sample_images

    folder = numpy_folder("tiny-pg1")
    captioner = Captioner.load(folder, device="cpu")
    vocab = captioner.text.tokenizer.get_vocab()
    forced = [vocab["<loc0012>"], vocab["<loc1023>"], vocab["a"], vocab["<seg007>"], vocab["<eos>"], vocab["<bos>"]]
    steps = iter(forced)

    def force(history: np.ndarray, logits: np.ndarray) -> np.ndarray:
        out = np.full_like(logits, -np.inf)
        out[:, next(steps)] = 0.0
        return out

    result = captioner.caption(sample_images(1), prompt="detect cat", max_new_tokens=8, logits_processors=[force])[0]
    assert result.tokens == forced[:4]  # stopped at <eos>
    assert result.text == "<loc0012><loc1023>a<seg007>"
    deltas = TextDeltas(captioner.text)
    streamed = "".join(deltas.add(token) for token in result.tokens)
    assert streamed + deltas.finish(result.text) == result.text and streamed == result.text
