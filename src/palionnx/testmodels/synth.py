"""Random-weight PaliGemma checkpoints of real or tiny geometries, written as transformers saves them.

Tests use the tiny geometries; users and benchmarks use the real ones to measure latency without
downloading a model. The tokenizer is built offline with the `tokenizers` library and follows the
PaliGemma id layout: text pieces, then 1024 `<locNNNN>` and 128 `<segNNN>` tokens, then `<image>`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma
EXTRA_TOKENS = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
IMAGE_TOKEN = "<image>"
SHARD_BYTES = 2 * 10**9  # safetensors shards of write_checkpoint
START_OF_TURN_ID, END_OF_TURN_ID, NEWLINE_ID = 106, 107, 108  # Gemma's ids; <end_of_turn> is a PG2 eos


@dataclass(frozen=True)
class Geometry:
    """Shapes of a PaliGemma checkpoint."""

    family: str  # "pg1" (Gemma decoder) or "pg2" (Gemma 2 decoder)
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    text_vocab: int  # pieces before the <loc>/<seg>/<image> tokens
    sliding_window: int = 4096
    query_pre_attn_scalar: int | None = None  # Gemma 2's attention scale is this ** -0.5 (None: head_dim)

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.text_vocab + len(EXTRA_TOKENS)

    @property
    def vocab_size(self) -> int:
        """The embedding rows: the tokenizer's size rounded up to 64, as in the released models."""
        return math.ceil((self.image_token_id + 1) / 64) * 64


Shapes = dict[str, Any]
_SIGLIP_SO400M: Shapes = dict(vision_hidden=1152, vision_intermediate=4304, vision_layers=27, vision_heads=16,
                              patch_size=14)
_GEMMA_2B: Shapes = dict(hidden=2048, intermediate=16384, layers=18, heads=8, kv_heads=1, head_dim=256,
                         text_vocab=256000)
_GEMMA2_2B: Shapes = dict(hidden=2304, intermediate=9216, layers=26, heads=8, kv_heads=4, head_dim=256,
                          text_vocab=256000)
_GEMMA2_9B: Shapes = dict(hidden=3584, intermediate=14336, layers=42, heads=16, kv_heads=8, head_dim=256,
                          text_vocab=256000)
_GEMMA2_27B: Shapes = dict(hidden=4608, intermediate=36864, layers=46, heads=32, kv_heads=16, head_dim=128,
                           text_vocab=256000, query_pre_attn_scalar=144)  # hidden / heads, not head_dim
_DECODERS: dict[str, tuple[str, Shapes]] = {"pg1-3b": ("pg1", _GEMMA_2B), "pg2-3b": ("pg2", _GEMMA2_2B),
                                            "pg2-10b": ("pg2", _GEMMA2_9B), "pg2-28b": ("pg2", _GEMMA2_27B)}
_SIZES = (224, 448, 896)
_TINY_VISION: Shapes = dict(vision_hidden=32, vision_intermediate=64, vision_layers=2, vision_heads=2, patch_size=14)

# The released checkpoints: SigLIP-So400m at 224, 448 or 896 px (256, 1024, 4096 image tokens) before Gemma
# 2B (PaliGemma 1) or Gemma 2 2B / 9B / 27B (PaliGemma 2 3B / 10B / 28B).
GEOMETRIES: dict[str, Geometry] = {
    f"{name}-{size}": Geometry(family, image_size=size, **_SIGLIP_SO400M, **decoder)
    for name, (family, decoder) in _DECODERS.items() for size in _SIZES
}
# Real widths and vocabulary, 4 decoder (and vision) layers: speed at realistic matmuls, and the large models
# measured in part where the whole does not fit (`truncated`); the 28B at 224 px also with 8, so that two
# truncations give its cost per layer (benchmarks/big_models.py).
TRUNCATED_LAYERS = 4
GEOMETRIES.update({f"{name}-l{TRUNCATED_LAYERS}": replace(g, vision_layers=TRUNCATED_LAYERS, layers=TRUNCATED_LAYERS)
                   for name, g in list(GEOMETRIES.items()) if name.endswith("-224") or name.startswith("pg2-28b")})
GEOMETRIES["pg2-28b-224-l8"] = replace(GEOMETRIES["pg2-28b-224"], vision_layers=8, layers=8)
GEOMETRIES.update({
    # Tiny: 28 px images (4 image tokens), for tests. MQA for pg1, GQA + a short window for pg2.
    "tiny-pg1": Geometry(
        "pg1", image_size=28, **_TINY_VISION,
        hidden=64, intermediate=128, layers=2, heads=4, kv_heads=1, head_dim=16, text_vocab=1024,
    ),
    "tiny-pg2": Geometry(
        "pg2", image_size=28, **_TINY_VISION,
        hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2, head_dim=16, text_vocab=1024,
        sliding_window=6,
    ),
    # Tiny with the 28B's distinguishing settings: a query scale that is not head_dim, 2 query heads per KV
    # head; and a larger image grid (56 px: 4 x 4 patches) whose prompt outgrows the window, as 896 px does.
    "tiny-pg2-28b": Geometry(
        "pg2", image_size=56, **_TINY_VISION,
        hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, text_vocab=1024,
        sliding_window=12, query_pre_attn_scalar=24,
    ),
})


def _pseudo_words(count: int) -> list[str]:
    """Deterministic readable filler pieces ("▁kalo", "mire", ...) to fill the text vocabulary."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    words: list[str] = []
    n = 0
    while len(words) < count:
        a, b, c = n % len(syllables), (n // len(syllables)) % len(syllables), n // len(syllables) ** 2
        word = syllables[a] + syllables[b] + (syllables[c % len(syllables)] if c else "")
        words.append(("▁" + word) if n % 3 else word)
        n += 1
    return words


def _word_merges(words: Sequence[str], bare_words: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """BPE pieces and merges that make each of `words` one piece after a space ("▁red") and each of
    `bare_words` one piece at the start of a text ("three", no space before it).

    Each word is built left to right ("▁" + "r" -> "▁r", "▁r" + "e" -> "▁re", ...). Spaced forms rank first
    (their merges only apply at a word start); bare forms follow, longest first, so that a short word's
    merges never split a longer one before its own merges complete.
    """
    pieces: list[str] = []
    merges: list[tuple[str, str]] = []
    for word in ["▁" + w for w in words] + sorted(bare_words, key=len, reverse=True):
        for end in range(2, len(word) + 1):
            merge = (word[: end - 1], word[end - 1])
            if merge not in merges:
                merges.append(merge)
                pieces.append(word[:end])
    return list(dict.fromkeys(pieces)), merges


def build_tokenizer(geometry: Geometry, words: Sequence[str] = (), bare_words: Sequence[str] = ()) -> Tokenizer:
    """A Gemma-style BPE tokenizer (byte fallback, '▁' for spaces) with PaliGemma's special tokens.

    `words` become whole pieces after a space and `bare_words` at the start of a text (see `_word_merges`);
    all other text is split into characters.
    """
    pieces = list(SPECIALS)
    pieces += [f"<unused{i}>" for i in range(START_OF_TURN_ID - len(pieces))]
    pieces += ["<start_of_turn>", "<end_of_turn>", "\n"]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁"] + [chr(c) for c in range(33, 127)]
    word_pieces, merges = _word_merges(words, bare_words)
    pieces += [p for p in word_pieces if p not in pieces]
    taken = set(pieces)
    pieces += [w for w in _pseudo_words(geometry.text_vocab) if w not in taken][: geometry.text_vocab - len(pieces)]
    if len(pieces) != geometry.text_vocab:
        raise ValueError(f"text_vocab {geometry.text_vocab} is too small for {len(pieces)} base and word pieces")
    pieces += EXTRA_TOKENS + [IMAGE_TOKEN]
    vocab = {piece: i for i, piece in enumerate(pieces)}

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = SPECIALS + ["<start_of_turn>", "<end_of_turn>", IMAGE_TOKEN]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    split = [w for w in [" " + w for w in words] + list(bare_words) if len(tokenizer.encode(w).ids) != 1]
    if split:
        raise ValueError(f"these words do not come out as one piece: {split}")
    return tokenizer


def make_config(geometry: Geometry) -> Any:  # PaliGemmaConfig
    """The transformers config of a geometry, with the released models' token ids."""
    from transformers import PaliGemmaConfig

    g = geometry
    text = dict(
        hidden_size=g.hidden, intermediate_size=g.intermediate, num_hidden_layers=g.layers,
        num_attention_heads=g.heads, num_key_value_heads=g.kv_heads, head_dim=g.head_dim,
        vocab_size=g.vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        hidden_activation="gelu_pytorch_tanh",
    )
    if g.family == "pg2":
        text.update(
            model_type="gemma2", query_pre_attn_scalar=g.query_pre_attn_scalar or g.head_dim,
            sliding_window=g.sliding_window,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
            eos_token_id=[1, END_OF_TURN_ID],
        )
    else:
        text.update(model_type="gemma")
    vision = dict(
        model_type="siglip_vision_model", hidden_size=g.vision_hidden, intermediate_size=g.vision_intermediate,
        num_hidden_layers=g.vision_layers, num_attention_heads=g.vision_heads, patch_size=g.patch_size,
        image_size=g.image_size, projection_dim=g.hidden, vision_use_head=False,
    )
    return PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=g.image_token_id,
        vocab_size=g.vocab_size, projection_dim=g.hidden, hidden_size=g.hidden,
    )


def _random_weights(model: Any, seed: int, scale: float, embed_scale: float) -> Iterator[tuple[str, Any]]:
    """(name, seeded noise) for every parameter of `model` (which may live on the meta device), one at a time:
    N(0, scale/sqrt(fan_in)) for matrices, and random norm gains.

    Gemma's RMSNorm multiplies by (1 + w), so its w ~ N(0, 0.5) (Gemma 2's post-sublayer norms N(1, 0.5));
    SigLIP's LayerNorm uses w directly. With tied embeddings a random decoder tends to repeat its input
    token; random gains, a larger-than-default scale and a smaller embedding give varied greedy output.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            gemma_norm = "language_model" in name and ".post_" not in name
            yield name, noise * 0.5 + (0.0 if gemma_norm else 1.0)
        elif p.ndim == 1:
            yield name, noise * 0.02
        elif "embed_tokens" in name:
            yield name, noise * (embed_scale / math.sqrt(p.shape[1]))
        else:
            gain = scale if "language_model" in name else 1.0  # the vision tower stays tame
            yield name, noise * (gain / math.sqrt(math.prod(p.shape[1:])))


def _randomise(model: Any, seed: int, scale: float, embed_scale: float) -> None:
    """Fill the parameters of a materialised `model` in place with `_random_weights`."""
    import torch

    with torch.no_grad():
        for name, value in _random_weights(model, seed, scale, embed_scale):
            model.get_parameter(name).copy_(value)


def write_checkpoint(geometry: str | Geometry, outdir: str | Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a random-weight PaliGemma checkpoint (weights, config, processor) that
    `PaliGemmaForConditionalGeneration.from_pretrained(outdir)` and `AutoProcessor` load.

    The weights are drawn and written one tensor at a time into safetensors shards of at most SHARD_BYTES
    (with an index when there are several), so a 10B or 28B checkpoint is written in a few GB of RAM."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    g = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    config = make_config(g)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    model.tie_weights()
    scale = 1.0 if g.hidden >= 1024 else 2.0
    weights = _random_weights(model, seed, scale=scale, embed_scale=scale * (0.25 if g.family == "pg2" else 1.0))
    _write_shards(((name, value.to(getattr(torch, dtype))) for name, value in weights), outdir)
    config.dtype = dtype
    config.save_pretrained(outdir)
    _save_processing(g, build_tokenizer(g), config.text_config.eos_token_id, outdir)
    return outdir


def _write_shards(tensors: Iterator[tuple[str, Any]], outdir: Path) -> None:
    """Save (name, tensor) pairs as model.safetensors, or as numbered shards and their index when they exceed
    SHARD_BYTES, holding one shard in memory at a time."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    size = total = 0
    written: list[str] = []

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"part-{len(written):05d}.safetensors"
            save_file(current, str(outdir / name), metadata={"format": "pt"})
            written.append(name)
            shards.append(dict.fromkeys(current, name))
        current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            flush()
        current[name], size, total = tensor.contiguous(), size + nbytes, total + nbytes
    flush()
    if len(written) == 1:
        (outdir / written[0]).rename(outdir / "model.safetensors")
        return
    count = len(written)
    weight_map: dict[str, str] = {}
    for i, (old, shard) in enumerate(zip(written, shards, strict=True)):
        new = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        (outdir / old).rename(outdir / new)
        weight_map.update(dict.fromkeys(shard, new))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (outdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_checkpoint(model: Any, g: Geometry, tokenizer: Tokenizer, outdir: str | Path) -> Path:
    """Save `model` with its tokenizer and image processor as a transformers PaliGemma checkpoint folder."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(outdir)
    _save_processing(g, tokenizer, model.config.text_config.eos_token_id, outdir)
    return outdir


def _save_processing(g: Geometry, tokenizer: Tokenizer, eos: int | list[int], outdir: Path) -> None:
    """The generation config, tokenizer and image processor files of a checkpoint folder."""
    from transformers import GenerationConfig, PaliGemmaProcessor, PreTrainedTokenizerFast, SiglipImageProcessor

    GenerationConfig(bos_token_id=2, eos_token_id=eos, pad_token_id=0).save_pretrained(outdir)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    image_processor = SiglipImageProcessor(
        size={"height": g.image_size, "width": g.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        resample=3, do_convert_rgb=True,
    )
    setattr(image_processor, "image_seq_length", g.image_seq_length)  # noqa: B010 (not a declared attribute)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=fast)
    processor.save_pretrained(outdir)
