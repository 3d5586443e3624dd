"""The graphs of a model folder, and the decoder's KV cache for one batch.

The decoder's KV cache is one preallocated buffer per layer and per key/value, bound as both the graph's
past and present (GroupQueryAttention writes each new key in place). Rows fill the cache from slot 0:
prompts are right-padded and every row keeps its own length, so attention costs what each row has
filled, not the buffer's size. Every decode-step input and output lives at a fixed address, so on CUDA
the step is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import DECODER, DECODER_PREFILL, DECODER_WINDOWED, VISION_ENCODER, DecoderIO, graph_io
from .defaults import CPU_PREFILL_ROWS, CUDA_MIN_CACHE_SLOTS
from .limits import cache_length
from .manifest import Manifest
from .prompt import PromptBatch, lay_out
from .sessions import DeviceError, open_sessions, requested_device

BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16: numpy has no bfloat16, so such buffers are held as uint16
# A graph tensor type -> (the numpy type its buffers are made of, the element type they are bound as).
_CACHE_TYPES = {"tensor(float)": (np.float32, np.float32), "tensor(float16)": (np.float16, np.float16),
                "tensor(bfloat16)": (np.uint16, BFLOAT16)}
_ELEMENT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}


def model_device(manifest: Manifest, device: str) -> str:
    """The device to run a folder on: "auto" follows the folder (a CPU-built folder stays on the CPU even
    where CUDA exists); "cuda" for a CPU-built folder is a DeviceError saying how to export for CUDA."""
    if manifest.kv_dtype == "bfloat16" and device in ("auto", "cpu"):
        if device == "cpu" or requested_device("auto") != "cuda":
            raise DeviceError("this folder is bf16, which runs on CUDA only (onnxruntime's CPU attention has no "
                              "bfloat16 kernel): run it where onnxruntime-gpu sees a GPU, or export fp32, int8 or "
                              "int4 for the CPU")
        return "cuda"
    if device == "auto" and manifest.device == "cpu":
        return "cpu"
    if device == "cuda" and manifest.device == "cpu":
        raise DeviceError(
            f"this folder is built for the CPU ({manifest.quant.level}, float32 compute, which onnxruntime's CUDA "
            "attention lacks): export it for CUDA with `palionnx export ... --quant fp16` (or int8/int4 with "
            "--device cuda)"
        )
    return device


class OnnxPaliGemma:
    """The vision encoder and decoder sessions of an exported folder, all on one device.

    Prompts run on `prefill_decoder`: the folder's decoder_prefill graph where it has one (CPU folders whose
    prefill measured faster on other kernels; `prefill_graph=False` leaves it unloaded, saving its memory),
    else the decoder itself. Decode steps of at least `batch_decode_from` rows run on it too, where the export
    measured its kernels faster than the decoder's at that many rows (0: never).
    """

    def __init__(self, folder: str | Path, manifest: Manifest, device: str = "auto", threads: int | None = None,
                 cuda_graph: bool = True, prefill_graph: bool = True):
        self.folder, self.manifest, self.threads = Path(folder), manifest, threads
        roles = [VISION_ENCODER, DECODER] + [DECODER_PREFILL] * (prefill_graph and DECODER_PREFILL in manifest.graphs)
        paths = {role: self.folder / manifest.graphs[role].file for role in roles}
        wanted = model_device(manifest, device)
        self.cuda_graph = cuda_graph and requested_device(wanted) == "cuda"
        sessions, self.device = open_sessions(paths, wanted, threads, manifest, self._graph_roles())
        self.cuda_graph = self.cuda_graph and self.device == "cuda"
        self.vision, self.decoder = sessions[VISION_ENCODER], sessions[DECODER]
        self.prefill_decoder = sessions.get(DECODER_PREFILL, self.decoder)
        kernels = manifest.quant.cpu_kernels
        self.batch_decode_from = kernels.batch_decode_from if kernels and DECODER_PREFILL in sessions else 0
        self.windowed: ort.InferenceSession | None = None  # Gemma 2, opened when first needed
        self._uncaptured: dict[str, ort.InferenceSession] = {}  # decoders opened without CUDA graphs, by role
        self.providers = self.decoder.get_providers()
        self.io = DecoderIO(manifest.layers)
        # the cache's storage type and the element type it is bound as (they differ for bfloat16)
        self.kv_storage, self.kv_element = _CACHE_TYPES[
            {i.name: i.type for i in self.decoder.get_inputs()}[self.io.caches[0].past]]
        # onnxruntime-gpu 1.31's GroupQueryAttention ignores the padding of shorter rows when soft-capping
        # (Gemma 2) is combined with bidirectional attention: prefill such batches one row at a time.
        self.prefill_rows_alone = self.device == "cuda" and manifest.family == "pg2"
        self._graph_ids = 0
        # On CUDA, small batches get a cache of at least this many slots (see `cache_slots`).
        self.min_cache_slots = CUDA_MIN_CACHE_SLOTS if self.device == "cuda" else 0
        # On the CPU, prompts are prefilled at most this many at a time (0: all at once).
        self.prefill_chunk = CPU_PREFILL_ROWS if self.device == "cpu" else 0

    def _graph_roles(self) -> set[str]:
        return {DECODER, DECODER_WINDOWED} if self.cuda_graph else set()

    def encode_images(self, pixel_values: np.ndarray) -> ort.OrtValue:
        """[n, 3, H, W] -> image features [n, image_seq_length, hidden] float32, left on the device for the
        decoder to read as they are."""
        io = graph_io(VISION_ENCODER, 0)
        binding = self.vision.io_binding()
        binding.bind_cpu_input(io.inputs[0], np.ascontiguousarray(pixel_values, dtype=np.float32))
        binding.bind_output(io.outputs[0], self.device)
        self.vision.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def prompt_batch(self, pixels: np.ndarray, sequences: list[list[int]]) -> PromptBatch:
        """Encode pixel values [n, 3, H, W] and lay out the n prompts' token ids (`TextCodec.prompt_ids`)."""
        m = self.manifest
        return lay_out(sequences, self.encode_images(pixels), pad_id=m.pad_token_id, image_token_id=m.image_token_id,
                       image_tokens=m.image_seq_length)

    def decode_session(self, batch: int, max_len: int, captured: bool = True) -> ort.InferenceSession:
        """The decoder for decode steps of `batch` rows: Gemma 2's windowed graph once a row can outgrow the
        sliding window, else the prefill graph for batches of `batch_decode_from` rows or more, else the
        decoder. `captured=False` on a CUDA-graph model: the same graph opened without capture, for a state
        whose capture failed (opened on first use; the model itself is unchanged)."""
        window = self.manifest.sliding_window
        windowed = bool(window and max_len > window and DECODER_WINDOWED in self.manifest.graphs)
        if not windowed and self.batch_decode_from and batch >= self.batch_decode_from:
            return self.prefill_decoder
        role = DECODER_WINDOWED if windowed else DECODER
        if self.cuda_graph and not captured:
            if role not in self._uncaptured:
                self._uncaptured[role] = self._open(role, capture=False)
            return self._uncaptured[role]
        if not windowed:
            return self.decoder
        if self.windowed is None:
            self.windowed = self._open(DECODER_WINDOWED, capture=self.cuda_graph)
        return self.windowed

    def _open(self, role: str, capture: bool) -> ort.InferenceSession:
        """A session of the graph `role`, on this model's device, with CUDA graphs when `capture`."""
        paths = {role: self.folder / self.manifest.graphs[role].file}
        return open_sessions(paths, self.device, self.threads, self.manifest, {role} if capture else set())[0][role]

    def new_state(self, batch: int, max_len: int) -> DecoderState:
        """A new KV cache of its own for `batch` rows of up to `max_len` tokens (on CUDA, with its own captured
        decode graph). To run batch after batch on the same buffers, keep the state and `reset` it."""
        return DecoderState(self, batch, self.cache_slots(batch, max_len), self._next_graph_id())

    def cache_slots(self, batch: int, max_len: int) -> int:
        """Slots per row of the cache for `max_len` tokens: on CUDA, small batches get at least
        `min_cache_slots`, because GroupQueryAttention splits a decode step's attention over the cache's
        length (its total_sequence_length, fixed in the captured graph): a longer cache spreads one row's
        few heads over more of the GPU, while the work still follows each row's filled length. ValueError
        when `max_len` exceeds the model's positions."""
        if max_len > self.manifest.max_positions:
            raise ValueError(f"prompt + new tokens ({max_len}) exceed the model's {self.manifest.max_positions} "
                             "positions")
        return cache_length(self.manifest, batch, max_len, self.min_cache_slots)

    def _next_graph_id(self) -> int:
        self._graph_ids += 1
        return self._graph_ids



class StepOutput:
    """The decoder's outputs for one call, copied to the host only when first asked for (then kept)."""

    def __init__(self, logits: ort.OrtValue, next_token: ort.OrtValue):
        self._logits, self._next_token = logits, next_token
        self._host: dict[str, np.ndarray] = {}

    def logits(self) -> np.ndarray:
        """[b, vocab] float32 scores of the next token."""
        if "logits" not in self._host:
            self._host["logits"] = np.array(self._logits.numpy())
        return self._host["logits"]

    def next_token(self) -> np.ndarray:
        """[b] int64 argmax of the logits: all a greedy loop needs to read back."""
        if "next_token" not in self._host:
            self._host["next_token"] = np.array(self._next_token.numpy())
        return self._host["next_token"]

    def rows(self, rows: slice) -> RowsOutput:
        """The outputs of some rows only (each read back once for all of them)."""
        return RowsOutput(self, rows)


class RowsOutput:
    """Some rows of a StepOutput, as a DecoderOutput of their own."""

    def __init__(self, output: StepOutput, rows: slice):
        self.output, self.selected = output, rows

    def logits(self) -> np.ndarray:
        return self.output.logits()[self.selected]

    def next_token(self) -> np.ndarray:
        return self.output.next_token()[self.selected]


class DecoderState:
    """A batch's rows in the KV cache, with the decode step's inputs and outputs at fixed addresses."""

    def __init__(self, model: OnnxPaliGemma, batch: int, max_len: int, graph_id: int):
        self.model, self.batch, self.max_len, self.graph_id = model, batch, max_len, graph_id
        m, device = model.manifest, model.device
        shape = (batch, m.kv_heads, max_len, m.head_dim)

        def on_device(array: np.ndarray) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_numpy(array, device, 0)

        # Zero-filled once; GroupQueryAttention only reads the slots a row has filled. On the CPU the OrtValues are
        # views of these arrays (`host`), through which `copy_row` moves a row between states.
        self.host = [np.zeros(shape, dtype=model.kv_storage) for _ in model.io.caches]
        self.cache = [on_device(array) for array in self.host]
        if device != "cpu":
            self.host = []  # on the device: copied there, not shared
        self.token_ids = on_device(np.zeros((batch, 1), dtype=np.int64))
        self.no_features = on_device(np.zeros((1, 1, m.hidden), dtype=np.float32))  # decode steps add no image
        self.seqlens = on_device(np.zeros(batch, dtype=np.int32))
        self.last_index = on_device(np.arange(batch, dtype=np.int64))
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, m.vocab_size), np.float32, device, 0)
        self.next_token = ort.OrtValue.ortvalue_from_shape_and_type((batch,), np.int64, device, 0)
        # total_sequence_length of a decode step: on CUDA the cache size (a CUDA graph bakes this host value in),
        # on the CPU the longest row's length (the CPU kernel's work follows it).
        self.total = np.array(max_len, dtype=np.int32)
        self.lengths = np.zeros(batch, dtype=np.int32)  # tokens of each row in the cache
        self.captured = model.cuda_graph  # decode steps as a captured CUDA graph, until a capture fails
        self._bindings: dict[int, ort.IOBinding] = {}
        self._options = {capture: self._make_run_options(capture) for capture in (False, True)}

    def reset(self) -> None:
        """Empty every row, to run a new batch on the same buffers."""
        self.lengths[:] = 0

    def copy_row(self, source: DecoderState, row: int, into: int) -> None:
        """Put row `row` of `source`'s cache (its filled slots) into row `into` of this one: a prompt prefilled
        elsewhere joins this state's decode steps. Host caches only (CPU states)."""
        if not self.host or not source.host:
            raise ValueError("copy_row needs CPU states (their caches in host memory)")
        filled = int(source.lengths[row])
        for mine, theirs in zip(self.host, source.host):
            mine[into, :, :filled] = theirs[row, :, :filled]
        self.lengths[into] = filled

    def prefill(self, prompt: PromptBatch) -> StepOutput:
        """Run each row's whole prompt (right-padded [b, s]) into its empty cache slots 0 .. len - 1."""
        batch, width = prompt.input_ids.shape
        if batch != self.batch or width >= self.max_len:
            raise ValueError(f"a prompt batch of {batch} x {width} does not fit this cache "
                             f"({self.batch} x {self.max_len})")
        return self.prefill_rows(prompt, 0, batch)

    def prefill_rows(self, prompt: PromptBatch, start: int, stop: int, into: int | None = None) -> StepOutput:
        """Prefill prompt rows start .. stop - 1 into cache rows `into` .. (default: the same rows); the other
        rows of the cache, and their outputs, are untouched. Returns the outputs of every row."""
        into = start if into is None else into
        if self.model.prefill_rows_alone and len(set(prompt.lengths[start:stop].tolist())) > 1:
            for row in range(start, stop):  # see OnnxPaliGemma.prefill_rows_alone
                self._prefill(prompt, row, row + 1, into + row - start)
        else:
            chunk = self.model.prefill_chunk or stop - start
            for first in range(start, stop, chunk):
                self._prefill(prompt, first, min(first + chunk, stop), into + first - start)
        self.lengths[into : into + stop - start] = prompt.lengths[start:stop]
        return StepOutput(self.logits, self.next_token)

    def _prefill(self, prompt: PromptBatch, start: int, stop: int, into: int) -> None:
        lengths = prompt.lengths[start:stop]
        width = int(lengths.max())
        session = self.model.prefill_decoder
        binding = session.io_binding()
        io = self.model.io
        binding.bind_ortvalue_input(io.image_features, prompt.image_features)
        for name, array in ((io.input_ids, prompt.input_ids[start:stop, :width]),
                            (io.seqlens_k, (lengths - 1).astype(np.int32)),
                            (io.total_sequence_length, np.array(width, dtype=np.int32)),
                            (io.last_index, np.arange(stop - start) * width + lengths - 1)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        rows = stop - start
        self._bind_cache(binding, into, rows)
        self._bind_rows(binding, io.logits, self.logits, into, rows, output=True)
        self._bind_rows(binding, io.next_token, self.next_token, into, rows, output=True)
        session.run_with_iobinding(binding, self._run_options(capture=False))

    def _bind_cache(self, binding: ort.IOBinding, first: int, rows: int) -> None:
        """Bind cache rows first .. first + rows - 1 of every layer as both past and present: GroupQueryAttention
        writes the new keys and values into the same buffer, in place."""
        for pair, value in zip(self.model.io.caches, self.cache):
            self._bind_rows(binding, pair.past, value, first, rows, output=False, cache=True)
            self._bind_rows(binding, pair.present, value, first, rows, output=True, cache=True)

    def _bind_rows(self, binding: ort.IOBinding, name: str, value: ort.OrtValue, first: int, rows: int,
                   output: bool, cache: bool = False) -> None:
        """Bind `rows` rows of a buffer from row `first` by address (a view: nothing is copied). A cache buffer
        is bound as the graph's cache type (its storage differs for bfloat16)."""
        shape = value.shape()
        if cache:
            storage, element = self.model.kv_storage, self.model.kv_element
        else:
            storage = element = _ELEMENT[value.data_type()]
        row_bytes = int(np.prod(shape[1:])) * np.dtype(storage).itemsize
        args = (name, self.model.device, 0, element, [rows, *shape[1:]], value.data_ptr() + first * row_bytes)
        (binding.bind_output if output else binding.bind_input)(*args)

    def step(self, token_ids: np.ndarray, active: np.ndarray | None = None) -> StepOutput:
        """Feed one token per row into the next free slot of each row.

        `active` (default all) marks the rows in use; an idle row runs too (the step has a fixed shape) but
        stays empty: its token goes to slot 0 and its length stays 0.
        """
        if active is not None:
            self.lengths[~active] = 0
        if self.lengths.max() >= self.max_len:
            raise ValueError(f"the KV cache of {self.max_len} slots is full")
        self.token_ids.update_inplace(np.ascontiguousarray(token_ids.reshape(-1, 1), dtype=np.int64))
        self.seqlens.update_inplace(self.lengths)  # the new token goes to slot `length`: seqlens_k = length
        try:
            self._run_step()
        except Exception:
            if not self.captured:
                raise
            self.captured = False  # capture is not possible here: this state runs its steps plainly from now on
            self._run_step()
        self.lengths += 1 if active is None else active
        return StepOutput(self.logits, self.next_token)

    def _run_step(self) -> None:
        session = self.model.decode_session(self.batch, self.max_len, self.captured)
        binding = self._bindings.get(id(session))
        if binding is None:
            binding = session.io_binding()
            io = self.model.io
            for name, value in ((io.input_ids, self.token_ids), (io.image_features, self.no_features),
                                (io.seqlens_k, self.seqlens), (io.last_index, self.last_index)):
                binding.bind_ortvalue_input(name, value)
            binding.bind_cpu_input(io.total_sequence_length, self.total)
            self._bind_cache_and_outputs(binding)
            self._bindings[id(session)] = binding
        if self.model.device == "cpu":
            self.total = np.array(self.lengths.max() + 1, dtype=np.int32)
            binding.bind_cpu_input(self.model.io.total_sequence_length, self.total)
        session.run_with_iobinding(binding, self._run_options(capture=True))

    def _bind_cache_and_outputs(self, binding: ort.IOBinding) -> None:
        io = self.model.io
        self._bind_cache(binding, 0, self.batch)
        binding.bind_ortvalue_output(io.logits, self.logits)
        binding.bind_ortvalue_output(io.next_token, self.next_token)

    def _run_options(self, capture: bool) -> ort.RunOptions | None:
        """A decode step's (`capture`): its graph id while this state captures; prefill's: never captured, on
        the model's capture-enabled decoder."""
        return self._options[capture] if self.captured or not capture else None

    def _make_run_options(self, capture: bool) -> ort.RunOptions | None:
        """CUDA graphs: prefill is never captured (-1); each state's decode step has its own graph id."""
        if not self.model.cuda_graph:
            return None
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(self.graph_id if capture else -1))
        return options
