"""`palionnx bench`'s table: one row per model folder measured by `palionnx.runtime.measure`, and the CPU
kernels each folder uses with what they bought."""

from __future__ import annotations

from typing import Any

from ..runtime.defaults import DEFAULT_BLOCK_SIZE
from ..runtime.manifest import CpuKernels
from .info import site_summary

COLUMNS = [
    ("model", "model", "{}"), ("quant", "quant", "{}"), ("load_s", "load s", "{:.2f}"),
    ("vision_ms_per_image", "vision ms/img", "{:.1f}"), ("prefill_ms", "prefill ms", "{:.1f}"),
    ("decode_ms_per_token", "decode ms/tok", "{:.2f}"), ("tokens_per_s", "tok/s", "{:.1f}"),
    ("images_per_s", "img/s", "{:.3f}"), ("images_per_s_continuous", "img/s varied", "{:.3f}"),
    ("slot_occupancy", "slots busy", "{:.0%}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("gpu_memory_mb", "GPU MB", "{:.0f}"), ("size_on_disk_mb", "disk MB", "{:.0f}"),
]
AGREEMENT = [  # with --reference
    ("same_caption", "same caption", "{:.0%}"), ("forced_agreement", "next tok = ref", "{:.2%}"),
    ("forced_cosine", "cosine vs ref", "{:.5f}"),
]


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column titles and formatted cells, one row per model folder ("-" where a value does not apply); the
    agreement columns when some row has them."""
    columns = COLUMNS + (AGREEMENT if any("forced_cosine" in row for row in rows) else [])
    titles = [title for _, title, _ in columns]
    cells = [[("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns] for row in rows]
    return titles, cells


def kernels(rows: list[dict[str, Any]]) -> str:
    """For each CPU int8/int4 folder: the kernels its export chose and what they bought, against MatMulNBits
    at the default block size (the export's per-layer timings) and, for prefill on a decoder_prefill graph,
    against the decoder graph (timed here)."""
    lines = []
    for row in rows:
        plan = row.get("cpu_kernels")
        if not plan:
            continue
        where = f" at export on {plan['cpu']}" if plan["cpu"] else ""
        lines.append(f"kernels of {row['model']} (chosen by {plan['chosen_by']}{where}):")
        lines += [f"  {phase:8s} {plan[phase]:12s} {_bought(row, phase)}".rstrip()
                  for phase in ("vision", "prefill", "decode")]
        chosen = CpuKernels(**plan)
        if chosen.batch_decode_from:
            timed = [int(phase[5:]) for phase in chosen.probe_ms.get(chosen.prefill, {}) if phase.startswith("batch")]
            rows_at = f"batch{max(timed, default=chosen.batch_decode_from)}"  # the most rows timed at export
            times = [chosen.probe_ms.get(k, {}).get(rows_at) for k in (chosen.decode, chosen.prefill)]
            gain = f": {times[0] / times[1]:.2f}x the speed of {chosen.decode} at {rows_at[5:]} rows per layer " \
                "at export" if times[0] and times[1] else ""
            lines.append(f"  batches  {chosen.prefill:12s} decode steps of {chosen.batch_decode_from}+ rows{gain}")
        lines += [f"  inputs   {site_summary(chosen, role)}" for role in chosen.sites]
    return "\n".join(lines)


def _bought(row: dict[str, Any], phase: str) -> str:
    baseline = f"nbits{8 if row['quant'] == 'int8' else 4}-b{DEFAULT_BLOCK_SIZE}"
    gain = CpuKernels(**row["cpu_kernels"]).gain(phase, baseline)
    probe = f"{gain:.2f}x the speed of {baseline} per layer at export" if gain else ""
    on_decoder = row.get("prefill_ms_on_decoder")
    if phase != "prefill" or not on_decoder:
        return probe
    here = (f"decoder_prefill graph: {row['prefill_ms']:.0f} ms here against {on_decoder:.0f} ms on the decoder "
            f"graph ({on_decoder / row['prefill_ms']:.2f}x)")
    return f"{here}; {probe}" if probe else here
