"""What an export will cost, told before it starts and refused early when the machine lacks it.

The figures scale the export measured on the real `pg1-3b-224` geometry (2.92 B parameters, a 2-core 24 GB
machine; README, Export): the folder, its time and the captioning memory by the checkpoint's parameter count,
the export's peak RAM by its embedding table (vocab x hidden, held in float32 while it is quantized: the
largest tensor), the calibration and the captioning memory by the image tokens; checked on pg2-10b-224,
pg1-3b-896 and the real-width pg2-28b-224-l4 (benchmarks/results/big-*.md; the tests hold the plan to them).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..export.tune import PROMPT_TEXT_TOKENS, prefill_graph_bytes, prefill_graph_fits
from .tables import human_bytes

GB = 1e9
REFERENCE_PARAMS = 2.92e9  # pg1-3b-224
REFERENCE_EMBEDDING = 257_216 * 2048  # its vocab x hidden
# quant: (folder GB, export seconds, peak RSS GB) measured for REFERENCE_PARAMS with the fused decoder
# (benchmarks/results/fused-decoder-cpu.md; fp16 and int8 ran beside another job, so their times err high); the
# int8 / int4 folders without an int8 prefill graph (`--cpu-kernels nbits`), which is counted apart.
MEASURED = {
    "fp32": (11.71, 93, 4.6),
    "fp16": (5.86, 128, 3.6),
    "bf16": (5.86, 118, 3.6),  # measured alone on the AMD VM (/usr/bin/time palionnx export ... --quant bf16)
    "int8": (3.31, 227, 7.0),  # time and peak with the int8 prefill graph and calibration (README, Export)
    "int4": (1.85, 198, 6.1),  # time and peak with the int8 prefill graph and calibration (README, Export)
}
# int8 / int4 calibrate on 8 images through the float model: at 896 px (4096 image tokens) pg1-3b-896's int4
# export peaked 7.5 GB above pg1-3b-224's and took 700 s longer (benchmarks/results/big-pg1-3b-896.md); at
# 448 px no more than at 224. Of the 7.5 GB, the float decoder's attention scores over one prompt
# (export/calibrate.py: [heads, prompt, prompt] float32, about DECODER_SCORE_COPIES copies) follow the heads;
# the rest, the vision encoder's, is the same SigLIP in every PaliGemma. Both scale by image tokens squared
# (which errs high at 448); pg2-3b-896 (8 heads too) checks it, more heads are unmeasured.
CALIBRATION_TOKENS, CALIBRATION_PEAK_GB, CALIBRATION_SECONDS, REFERENCE_HEADS = 4096, 7.5, 700, 8
DECODER_SCORE_COPIES = 3
VISION_PARAMS = 0.43e9  # SigLIP-So400m and the projector: every PaliGemma's vision encoder
VISION_FP32_GB = 1.66  # int8 / int4 first write the vision encoder in fp32 (every PaliGemma's SigLIP), then
# quantize it
# RAM to caption with a folder without an int8 prefill graph: (GB, GB per billion parameters), peak RSS of one
# 256-token caption fitted through pg1-3b-224 (README, Quant levels) and pg2-10b-224
# (benchmarks/results/big-pg2-10b-224.md) for int8 and int4; fp32 from pg1-3b-224 with 4 bytes a parameter;
# fp16 / bf16 (CUDA levels) assumed at 2 bytes a parameter
RUN_RAM = {"fp32": (1.5, 4.0), "fp16": (1.5, 2.0), "bf16": (1.5, 2.0), "int8": (1.4, 1.15), "int4": (1.1, 0.65)}
# ... plus, beyond 224 px, attention over more image tokens in the vision encoder and the prefill: pg1-3b-896's
# caption peaked 4.4 GB above pg1-3b-224's (9.6 GB against 5.2, both with the int8 prefill graph;
# benchmarks/results/big-pg1-3b-896.md), scaled by image tokens squared; and the int8 prefill graph's weights
# (about a byte a parameter), where the export may add them.
RUN_IMAGE_GB = 4.4
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ExportEstimate:
    """Resources an export of one checkpoint at one quant level needs, and captioning with its folder."""

    quant: str
    params: float
    download_bytes: int  # the checkpoint files not in the hub cache yet
    folder_bytes: float
    scratch_bytes: float  # the fp32 vision graph written before quantizing, removed at the end
    peak_ram_bytes: float
    seconds: float
    run_ram_bytes: float  # RAM to caption with the folder
    prefill_graph_bytes: float = 0.0  # of the folder and captioning RAM: the int8 prefill graph this export may add
    local: bool = False  # a checkpoint folder on this machine, not a hub id

    def describe(self) -> str:
        minutes, seconds = divmod(round(self.seconds), 60)
        download = "local checkpoint" if self.local else "checkpoint in the hub cache"
        if self.download_bytes:
            download = f"download {human_bytes(self.download_bytes)}"
        count = f"{self.params / 1e9:.2f} B" if self.params >= 1e8 else f"{self.params / 1e6:.1f} M"
        prefill = bool(self.prefill_graph_bytes) * (f" (with {human_bytes(self.prefill_graph_bytes)} for an int8 "
                                                    "prefill graph, where it measures faster)")
        return (f"{download}; export of a {count}-parameter checkpoint: about {minutes} min {seconds:02d} s on "
                f"2 cores, up to {human_bytes(self.peak_ram_bytes)} of RAM, {human_bytes(self.folder_bytes)} on "
                f"disk (plus {human_bytes(self.scratch_bytes)} while it runs); captioning with it: about "
                f"{human_bytes(self.run_ram_bytes)} of RAM{prefill}")



def parameter_count(files: Mapping[str, int | None], config: dict) -> float:
    """Parameters of a checkpoint from its weight files' sizes and the dtype its config.json names."""
    weight_bytes = sum(size or 0 for name, size in files.items() if name.endswith((".safetensors", ".bin")))
    dtype = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("torch_dtype")
    return weight_bytes / _DTYPE_BYTES.get(str(dtype), 2)  # unknown: assume 16-bit, which errs on the high side


def embedding_size(config: dict) -> float | None:
    """vocab x hidden of the checkpoint's language model, from its config.json (None when it does not say)."""
    text = config.get("text_config") or {}
    vocab, hidden = text.get("vocab_size") or config.get("vocab_size"), text.get("hidden_size")
    return float(vocab * hidden) if isinstance(vocab, int) and isinstance(hidden, int) else None


def estimate(params: float, quant: str, download_bytes: int, embedding: float | None = None,
             image_tokens: int = 256, heads: int = REFERENCE_HEADS, total_ram: float | None = None,
             both_decoders: bool = False) -> ExportEstimate:
    """Scale the measured export to `params` (its peak RAM to `embedding`, vocab x hidden, when known; the
    calibration of int8 / int4 to `image_tokens` and the decoder's attention `heads`). An int8 / int4 folder's
    int8 prefill graph is counted where the export could add it (export/tune.py, for a machine of `total_ram`;
    always when it is not known); `both_decoders`: every prompt outgrows a PaliGemma 2 window, so the windowed
    decoder graph is loaded beside the decoder (README, Limits)."""
    folder_gb, measured_seconds, peak_gb = MEASURED[quant]
    scale = params / REFERENCE_PARAMS
    peak = peak_gb * (embedding / REFERENCE_EMBEDDING if embedding else scale) * GB
    seconds = measured_seconds * scale
    scratch = prefill_graph = 0.0
    if quant in ("int8", "int4"):
        scratch = min(VISION_FP32_GB, VISION_FP32_GB * scale) * GB
        patches = _beyond_224(image_tokens)
        scores = DECODER_SCORE_COPIES * REFERENCE_HEADS * CALIBRATION_TOKENS**2 * 4 / GB
        peak += (CALIBRATION_PEAK_GB - scores + scores * heads / REFERENCE_HEADS) * patches * GB
        seconds += CALIBRATION_SECONDS * patches * max(1.0, scale)
        table = embedding or 0.0
        prefill_graph = prefill_graph_bytes(quant, max(0.0, params - table - VISION_PARAMS), table)
        if total_ram is not None and not prefill_graph_fits(prefill_graph, total_ram):
            prefill_graph = 0.0
    captioning = run_ram(params, quant, image_tokens) + prefill_graph
    if both_decoders:  # pg2-3b-896 int4 peaked at 15.1 GB, 7 % above this (benchmarks/results/big-pg2-3b-896.md)
        captioning += RUN_RAM[quant][1] * params / 1e9 * GB + prefill_graph
    return ExportEstimate(quant, params, download_bytes, folder_gb * scale * GB + prefill_graph, scratch, peak,
                          seconds, captioning, prefill_graph)


def checkpoint_estimate(files: Mapping[str, int | None], config: dict, quant: str, download_bytes: int,
                        total_ram: float | None = None) -> ExportEstimate:
    """`estimate` for a checkpoint of these weight files' sizes and this config.json."""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    size, patch = vision.get("image_size") or 224, vision.get("patch_size") or 14
    image_tokens = int(vision.get("num_image_tokens") or (int(size) // int(patch)) ** 2)
    window = text.get("sliding_window") if text.get("model_type") == "gemma2" else None
    return estimate(parameter_count(files, config), quant, download_bytes, embedding_size(config), image_tokens,
                    int(text.get("num_attention_heads") or REFERENCE_HEADS), total_ram,
                    isinstance(window, int) and image_tokens + PROMPT_TEXT_TOKENS > window)


def run_ram(params: float, quant: str, image_tokens: int = 256) -> float:
    """Peak RAM, in bytes, of captioning with a `quant` folder of a `params`-parameter checkpoint."""
    base_gb, per_billion_gb = RUN_RAM[quant]
    return (base_gb + per_billion_gb * params / 1e9 + RUN_IMAGE_GB * _beyond_224(image_tokens)) * GB


def _beyond_224(image_tokens: int) -> float:
    """How far `image_tokens`' attention (tokens squared) is beyond 224 px's, where 896 px's is 1."""
    return max(0.0, (image_tokens**2 - 256**2) / (CALIBRATION_TOKENS**2 - 256**2))


def local_estimate(folder: Path, quant: str, total_ram: float | None = None) -> ExportEstimate:
    """What exporting the local checkpoint `folder` at `quant` costs (nothing to download) on a machine of
    `total_ram`."""
    files = {path.name: path.stat().st_size for path in folder.iterdir() if path.is_file()}
    config = read_config(folder / "config.json")
    return replace(checkpoint_estimate(files, config, quant, 0, total_ram), local=True)


def shortfall(plan: ExportEstimate, available_ram: float | None, free_disk: float,
              total_ram: float | None = None) -> str | None:
    """Why this machine cannot run the export, or could not caption with its folder (None when it can)."""
    if total_ram is not None and plan.run_ram_bytes > total_ram:
        return (f"captioning with its {plan.quant} folder needs about {human_bytes(plan.run_ram_bytes)} of RAM and "
                f"this machine has {human_bytes(total_ram)}: export a smaller level (int4 needs the least)")
    if available_ram is not None and plan.peak_ram_bytes > available_ram:
        return (f"the export needs about {human_bytes(plan.peak_ram_bytes)} of RAM at its peak and "
                f"{human_bytes(available_ram)} is available")
    need = plan.download_bytes + plan.folder_bytes + plan.scratch_bytes
    if need > free_disk:
        return f"the export needs about {human_bytes(need)} of disk and {human_bytes(free_disk)} is free"
    return None


def free_disk(path: Path) -> float:
    """Free bytes on the disk that holds `path` (or would: its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return float(shutil.disk_usage(path).free)


def read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
