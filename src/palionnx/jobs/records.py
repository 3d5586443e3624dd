"""What a captioning run reports: one `Record` per image (--jsonl, --parquet), the run's `Summary`, and the
`Recorder` that counts, shows and writes them."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .files import append_line
from .options import CaptionOptions
from .progress import Progress


@dataclass
class Summary:
    captioned: int = 0
    skipped: int = 0  # had a caption already
    failed: int = 0
    clashes: int = 0  # not captioned: another image of the same name owns the caption file
    by_others: int = 0  # captioned meanwhile by another run on the same folder
    elapsed_s: float = 0.0
    interrupted: bool = False
    occupancy: float | None = None  # continuous batching: mean busy slots / slots over the decode steps

    def line(self) -> str:
        rate = self.captioned / self.elapsed_s if self.elapsed_s else 0.0
        state = "stopped early: " if self.interrupted else ""
        extra = "".join([f", {self.by_others} done by other runs" if self.by_others else "",
                         f", {self.clashes} name clash{'es' if self.clashes > 1 else ''}" if self.clashes else ""])
        busy = f", slots {self.occupancy:.0%} busy" if self.occupancy is not None else ""
        resume = "; re-run the same command to resume" if self.interrupted else ""
        return (f"{state}{self.captioned} captioned, {self.skipped} skipped, {self.failed} failed{extra} "
                f"in {self.elapsed_s:.1f}s ({rate:.2f} images/s{busy}){resume}")


@dataclass
class Record:
    """One line of --jsonl. status: captioned, failed, or clash (see `plan_run`)."""

    path: str
    status: str = "captioned"
    tokens: int = 0
    error: str | None = None
    output: str | None = None
    caption: str | None = None  # the caption file's text as written
    captions: list[str] | None = None  # this run's new captions, with --existing append / prepend or several
    timings: dict[str, float] = field(default_factory=dict)
    attempts: int = 1  # captions generated for the image (more than one with --min-words and --retries)

    def fields(self) -> dict[str, Any]:
        """The record as --jsonl and --parquet store it: text that is not valid UTF-8 (a file name of other
        bytes, which the OS hands over with surrogate escapes) is written with its bad bytes as \\xNN, and for
        `path` and `output` the name's exact bytes go in `path_bytes` / `output_bytes` (base64)."""
        data = asdict(self)
        if data["captions"] is None:
            del data["captions"]
        for key, value in list(data.items()):
            if isinstance(value, str) and not _is_utf8(value):
                data[key] = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                if key in ("path", "output"):
                    data[key + "_bytes"] = base64.b64encode(os.fsencode(value)).decode("ascii")
        return data

    def line(self) -> str:
        return json.dumps(self.fields(), ensure_ascii=False)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Recorder:
    """Counts results into the summary, updates progress and appends --jsonl lines."""

    def __init__(self, summary: Summary, options: CaptionOptions, progress: Progress):
        self.summary, self.progress = summary, progress
        self.jsonl: IO[str] | None = open(options.jsonl, "a", encoding="utf-8") if options.jsonl else None  # noqa: SIM115
        self.parquet = options.parquet
        self.records: list[dict] = []
        self.earlier: set[str] | None = None  # --jsonl lines of earlier runs, read when first needed

    def add(self, record: Record, shown: bool = True) -> None:
        """Count `record`, show it (unless it was shown when planned), write it to --jsonl / --parquet."""
        if record.status == "captioned":
            self.summary.captioned += 1
        elif record.status == "clash":
            self.summary.clashes += 1
        else:
            self.summary.failed += 1
        if shown:
            self.progress.update(Path(record.path), f"{record.tokens} tokens", record.error)
        if self.jsonl:
            self._write(record.line(), once=not shown)
        if self.parquet:
            self.records.append(record.fields())

    def _write(self, line: str, once: bool) -> None:
        """Append a --jsonl line; with `once`, only if an earlier run has not (a name clash is recorded once,
        not on every re-run)."""
        assert self.jsonl is not None
        if once:
            if self.earlier is None:
                with open(self.jsonl.name, encoding="utf-8", errors="replace") as existing:
                    self.earlier = {row.rstrip("\n") for row in existing}
            if line in self.earlier:
                return
        append_line(self.jsonl, line)

    def close(self) -> None:
        """Close --jsonl; write --parquet (one row per image of this run, written at the end)."""
        self.progress.close()
        if self.jsonl:
            self.jsonl.close()
        if self.parquet and self.records:
            import pyarrow as pa
            import pyarrow.parquet as pq

            columns = list(dict.fromkeys(key for record in self.records for key in record))  # *_bytes in some only
            pq.write_table(pa.Table.from_pylist([{key: r.get(key) for key in columns} for r in self.records]),
                           self.parquet)
