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
# 4: fused decoder (GroupQueryAttention, in-place KV cache, embedding inside), no embed_tokens graph;
#    files (size and SHA-256 of every file), max_positions, device (what the graphs are built for).
# 5: CPU kernels chosen by measurement (quant.cpu_kernels), optional decoder_prefill graph.
# 6: int8 activations per row (QGEMM), outlier channels split off per site from calibration
#    (quant.cpu_kernels.sites, .activations, .calibration), batched decode on decoder_prefill.
SCHEMA_VERSION = 6
READABLE_SCHEMAS = (5, 6)  # a schema 5 folder reads as one with none of 6's fields (they default)

VISION_ENCODER, DECODER, DECODER_WINDOWED = "vision_encoder", "decoder", "decoder_windowed"
DECODER_PREFILL = "decoder_prefill"
GRAPH_FILES = {
    VISION_ENCODER: "vision_encoder.onnx",
    DECODER: "decoder.onnx",
    DECODER_WINDOWED: "decoder_windowed.onnx",  # Gemma 2 only: decode steps once the sliding window can bind
    DECODER_PREFILL: "decoder_prefill.onnx",  # CPU int8/int4, when measured faster: prompts on int8 QGEMM
}
DECODER_GRAPHS = (DECODER, DECODER_WINDOWED, DECODER_PREFILL)  # one contract, one weights file
REQUIRED_GRAPHS = (VISION_ENCODER, DECODER)


@dataclass(frozen=True)
class GraphIO:
    """The input and output names of one graph, in the graph's order."""

    inputs: list[str]
    outputs: list[str]


@dataclass(frozen=True)
class CacheIO:
    """One layer's key or value cache: the input it is read from and the output it is written to (bind one
    buffer to both)."""

    past: str
    present: str


@dataclass(frozen=True)
class DecoderIO:
    """The inputs and outputs of every decoder graph (decoder, decoder_windowed, decoder_prefill) of a
    `layers`-layer model, by meaning (see `graph_io` for what each holds)."""

    layers: int
    input_ids: str = "input_ids"
    image_features: str = "image_features"
    seqlens_k: str = "seqlens_k"
    total_sequence_length: str = "total_sequence_length"
    last_index: str = "last_index"
    logits: str = "logits"
    next_token: str = "next_token"

    @property
    def caches(self) -> list[CacheIO]:
        """Per layer its key cache then its value cache, in the graph's order."""
        return [CacheIO(past, present) for past, present in zip(past_names(self.layers), present_names(self.layers))]

    @property
    def inputs(self) -> list[str]:
        return [self.input_ids, self.image_features, self.seqlens_k, self.total_sequence_length, self.last_index,
                *past_names(self.layers)]

    @property
    def outputs(self) -> list[str]:
        return [self.logits, self.next_token, *present_names(self.layers)]


def past_names(layers: int) -> list[str]:
    """Decoder cache inputs: past_key_values.N.key, past_key_values.N.value for each layer N."""
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """Decoder cache outputs: present.N.key, present.N.value for each layer N."""
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def graph_io(role: str, layers: int) -> GraphIO:
    """What each graph takes and gives.

    - vision_encoder: pixel_values [b, 3, H, W] float32 -> image_features [b, image_seq_length, hidden] float32
      (not scaled).
    - decoder (and decoder_windowed and decoder_prefill, the same contract): one call feeds `s` new tokens per
      row into a KV cache that rows fill from slot 0 (prompts are right-padded):
      input_ids [b, s] int64 (negative where an image feature goes: -1 - id is its row in the flattened
      image_features), image_features [n, tokens, hidden] float32 (the vision encoder's output as it is; a
      decode step binds one zero row), seqlens_k [b] int32 (tokens of the row in the cache after this
      call, minus 1), total_sequence_length [] int32 (s for the prompt; the cache's max_len for a decode
      step), last_index [b] int64 (flat index into b x s of each row's token whose logits are returned),
      and per layer past_key_values.N.key / .value [b, kv_heads, max_len, head_dim] ->
      logits [b, vocab] float32, next_token [b] int64 (their argmax) and present.N.key / .value: the same
      buffers as the past ones (bind one buffer to both; the call writes its keys at slots
      seqlens_k - s + 1 .. seqlens_k of each row). The first call of a sequence feeds its whole prompt
      (bidirectional attention); later calls feed one token each. decoder_prefill, where a folder has it,
      is the decoder with other kernels for its linear layers: the runtime runs prompts on it, with the
      same cache buffers.
    """
    if role == VISION_ENCODER:
        return GraphIO(["pixel_values"], ["image_features"])
    if role in DECODER_GRAPHS:
        io = DecoderIO(layers)
        return GraphIO(io.inputs, io.outputs)
    raise KeyError(f"unknown graph role {role!r}")


def data_file(graph_file: str) -> str:
    """The external-data file holding a graph's weights (every decoder graph shares the decoder's)."""
    shared = {GRAPH_FILES[role] for role in DECODER_GRAPHS}
    return GRAPH_FILES[DECODER] + ".data" if graph_file in shared else graph_file + ".data"


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
