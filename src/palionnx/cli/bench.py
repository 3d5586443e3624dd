"""`palionnx bench`'s table: one row per model folder measured by `palionnx.runtime.measure`."""

from __future__ import annotations

from typing import Any

COLUMNS = [
    ("model", "model", "{}"), ("quant", "quant", "{}"), ("load_s", "load s", "{:.2f}"),
    ("vision_ms_per_image", "vision ms/img", "{:.1f}"), ("prefill_ms", "prefill ms", "{:.1f}"),
    ("decode_ms_per_token", "decode ms/tok", "{:.2f}"), ("tokens_per_s", "tok/s", "{:.1f}"),
    ("images_per_s", "img/s", "{:.3f}"), ("images_per_s_continuous", "img/s varied", "{:.3f}"),
    ("slot_occupancy", "slots busy", "{:.0%}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("gpu_memory_mb", "GPU MB", "{:.0f}"), ("size_on_disk_mb", "disk MB", "{:.0f}"),
]


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column titles and formatted cells, one row per model folder ("-" where a value does not apply)."""
    titles = [title for _, title, _ in COLUMNS]
    cells = [[("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in COLUMNS] for row in rows]
    return titles, cells
