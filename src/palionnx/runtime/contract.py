"""The model-folder contract: file names, graph roles, their input/output names, the manifest's schema.

Export writes a folder through these names and the runtime reads it through them; nothing else in the
package spells a graph's file or I/O name. `tests/test_contract.py` checks every exported folder's real
graphs against `graph_io`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "palionnx.json"
TOKENIZER_NAME = "tokenizer.json"
# 3: typed quant settings, prompt_template applied as written ({image}, {bos}, {prompt} anywhere).
# 4: files (size and SHA-256 of every file), max_positions.
SCHEMA_VERSION = 4

VISION_ENCODER, EMBED_TOKENS, DECODER = "vision_encoder", "embed_tokens", "decoder"
GRAPH_FILES = {
    VISION_ENCODER: "vision_encoder.onnx",
    EMBED_TOKENS: "embed_tokens.onnx",
    DECODER: "decoder_model_merged.onnx",
}


@dataclass(frozen=True)
class GraphIO:
    """The input and output names of one graph, in the graph's order."""

    inputs: list[str]
    outputs: list[str]


def past_names(layers: int) -> list[str]:
    """Decoder cache inputs: past_key_values.N.key, past_key_values.N.value for each layer N."""
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """Decoder cache outputs: present.N.key, present.N.value for each layer N."""
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def graph_io(role: str, layers: int) -> GraphIO:
    """What each graph takes and gives.

    - vision_encoder: pixel_values [b, 3, H, W] -> image_features [b, image_seq_length, hidden].
    - embed_tokens: input_ids [b, s] -> inputs_embeds [b, s, hidden] (scaled by sqrt(hidden)).
    - decoder: inputs_embeds [b, s, hidden], attention_mask [b, max_len], position_ids [b, s] (1-indexed),
      past_length [] and the cache [b, kv_heads, max_len, head_dim] per layer -> logits [b, vocab] of the
      last position, next_token [b] (its argmax) and the updated cache.
    """
    if role == VISION_ENCODER:
        return GraphIO(["pixel_values"], ["image_features"])
    if role == EMBED_TOKENS:
        return GraphIO(["input_ids"], ["inputs_embeds"])
    if role == DECODER:
        return GraphIO(
            ["inputs_embeds", "attention_mask", "position_ids", "past_length", *past_names(layers)],
            ["logits", "next_token", *present_names(layers)],
        )
    raise KeyError(f"unknown graph role {role!r}")


def data_file(graph_file: str) -> str:
    """The external-data file holding a graph's weights."""
    return graph_file + ".data"


def graph_files(folder: str | Path, role: str) -> list[Path]:
    """The graph file of `role` and its weights file."""
    graph = Path(folder) / GRAPH_FILES[role]
    return [graph, graph.with_name(data_file(graph.name))]


def files_size(paths: list[Path]) -> int:
    """Bytes of the files among `paths` that exist."""
    return sum(path.stat().st_size for path in paths if path.is_file())


def folder_size(folder: str | Path) -> int:
    """Bytes of the files directly in `folder` (a model folder has no subfolders)."""
    return files_size(list(Path(folder).iterdir()))
