"""The random-weight checkpoint factory: loadable by transformers, and varied enough for parity tests."""

import pytest
from transformers import AutoConfig

from palionnx.export.validate import reference_generate
from palionnx.samples import sample_images
from palionnx.testmodels.synth import GEOMETRIES, IMAGE_TOKEN, build_tokenizer


@pytest.mark.parametrize("family", ["tiny-pg1", "tiny-pg2"])
def test_reference_generate_is_varied(family, reference):
    """Greedy output must not be one repeated token, nor stop at once: otherwise parity tests are hollow."""
    model, processor = reference(family)
    sequences, _ = reference_generate(model, processor, sample_images(4), ["caption en"] * 4, 24)
    for seq in sequences:
        assert len(seq) >= 12, seq
        assert len(set(seq)) >= 8, seq
    assert len({tuple(s) for s in sequences}) == 4, "different images should give different captions"


def test_checkpoint_layout(checkpoints):
    pg1 = AutoConfig.from_pretrained(checkpoints["tiny-pg1"])
    pg2 = AutoConfig.from_pretrained(checkpoints["tiny-pg2"])
    assert pg1.text_config.model_type == "gemma" and pg1.text_config.num_key_value_heads == 1
    assert pg2.text_config.model_type == "gemma2"
    assert pg2.text_config.num_key_value_heads == 2 and pg2.text_config.num_attention_heads == 4
    assert pg2.text_config.final_logit_softcapping == 30.0 and pg2.text_config.sliding_window == 6
    for folder in checkpoints.values():
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names


@pytest.mark.parametrize("name", ["tiny-pg1", "pg1-3b-224", "pg2-3b-224"])
def test_tokenizer_has_paligemma_layout(name):
    geometry = GEOMETRIES[name]
    tokenizer = build_tokenizer(geometry)
    assert tokenizer.get_vocab_size() == geometry.image_token_id + 1 <= geometry.vocab_size
    assert tokenizer.token_to_id(IMAGE_TOKEN) == geometry.image_token_id
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "\n")] == [0, 1, 2, 108]
    ids = tokenizer.encode("caption en\n", add_special_tokens=False).ids
    assert tokenizer.decode(ids) == "caption en\n"


def test_real_geometries():
    assert GEOMETRIES["pg1-3b-224"].image_seq_length == 256
    assert GEOMETRIES["pg1-3b-448"].image_seq_length == 1024
    assert GEOMETRIES["pg1-3b-224"].vocab_size == 257216
    assert GEOMETRIES["pg1-3b-224"].image_token_id == 257152
