"""The random-weight checkpoint factory: loadable by transformers, and varied enough for parity tests."""

import pytest
from transformers import AutoConfig

from palionnx.export.validate import reference_generate
from palionnx.samples import sample_images
from palionnx.testmodels.synth import GEOMETRIES, IMAGE_TOKEN, build_tokenizer


@pytest.mark.parametrize("family", ["tiny-pg1", "tiny-pg2", "tiny-pg2-28b"])
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


# The released checkpoints' config.json (google/paligemma-3b-pt-*, google/paligemma2-{3b,10b,28b}-pt-*), field by
# field: the decoder's (layers, hidden, heads, KV heads, head_dim, MLP, query_pre_attn_scalar) per model ...
PUBLISHED_DECODERS = {
    "pg1-3b": dict(model_type="gemma", num_hidden_layers=18, hidden_size=2048, num_attention_heads=8,
                   num_key_value_heads=1, head_dim=256, intermediate_size=16384),
    "pg2-3b": dict(model_type="gemma2", num_hidden_layers=26, hidden_size=2304, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, intermediate_size=9216, query_pre_attn_scalar=256),
    "pg2-10b": dict(model_type="gemma2", num_hidden_layers=42, hidden_size=3584, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=256, intermediate_size=14336, query_pre_attn_scalar=256),
    "pg2-28b": dict(model_type="gemma2", num_hidden_layers=46, hidden_size=4608, num_attention_heads=32,
                    num_key_value_heads=16, head_dim=128, intermediate_size=36864, query_pre_attn_scalar=144),
}
GEMMA2 = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096)
# ... SigLIP-So400m/14 for all, and the image tokens per image size.
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
IMAGE_TOKENS = {224: 256, 448: 1024, 896: 4096}


@pytest.mark.parametrize("name", [f"{model}-{size}" for model in PUBLISHED_DECODERS for size in IMAGE_TOKENS]
                         + ["pg2-10b-224-l4", "pg2-28b-896-l4", "pg2-28b-224-l8"])
def test_real_geometries_have_the_published_configs(name):
    from palionnx.testmodels.synth import make_config

    family, params, size = name.split("-")[:3]
    model, layers = f"{family}-{params}", int(name.split("-l")[1]) if "-l" in name else None
    config = make_config(GEOMETRIES[name])
    expected = dict(PUBLISHED_DECODERS[model], **(GEMMA2 if model.startswith("pg2") else {}))
    if layers:
        expected["num_hidden_layers"] = layers
    assert {key: getattr(config.text_config, key) for key in expected} == expected
    vision = dict(SIGLIP, image_size=int(size), num_hidden_layers=layers or 27)
    assert {key: getattr(config.vision_config, key) for key in vision} == vision
    assert GEOMETRIES[name].image_seq_length == IMAGE_TOKENS[int(size)] == (int(size) // 14) ** 2
    assert config.text_config.vocab_size == 257216 and config.image_token_index == 257152
    assert config.projection_dim == config.text_config.hidden_size == PUBLISHED_DECODERS[model]["hidden_size"]
    eos = config.text_config.eos_token_id
    assert eos == ([1, 107] if model.startswith("pg2") else 1)
