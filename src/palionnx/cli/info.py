"""`palionnx info`'s rows: the manifest, the files, and this machine's execution providers."""

from __future__ import annotations

from pathlib import Path

from ..runtime.contract import folder_size, graph_files
from ..runtime.integrity import hash_problems
from ..runtime.manifest import CpuKernels, Manifest


def info_rows(folder: Path, m: Manifest) -> list[tuple[str, str]]:
    """What `palionnx info FOLDER` prints, as (name, value) rows."""
    import onnxruntime as ort

    rows = [
        ("folder", str(folder)),
        ("source", f"{m.source.get('id')} (revision {m.source.get('revision') or '-'})"),
        ("family", f"{m.family} ({'Gemma 2' if m.family == 'pg2' else 'Gemma'} decoder), exported by palionnx "
                   f"{m.palionnx_version}, opset {m.opset}"),
        ("quant", ", ".join(f"{k}={v}" for k, v in m.quant.to_json().items() if k not in ("fp32_kept", "cpu_kernels"))),
        *_kernel_rows(m),
        ("built for", f"{m.device} ({m.kv_dtype} compute)"),
        ("image", f"{m.image_size}px -> {m.image_seq_length} tokens, mean {m.image_mean}, std {m.image_std}, "
                  f"{m.resample}"),
        ("decoder", f"{m.layers} layers, hidden {m.hidden}, {m.heads} heads / {m.kv_heads} kv heads x {m.head_dim}, "
                    f"vocab {m.vocab_size}, context {m.max_positions}, sliding window {m.sliding_window or '-'}, "
                    f"kv {m.kv_dtype}"),
        ("tokens", f"bos {m.bos_token_id}, eos {m.eos_token_ids}, image {m.image_token_id}, "
                   f"prompt {m.prompt_template!r}"),
    ]
    for role, graph in m.graphs.items():
        size = sum(m.files[path.name].size for path in graph_files(folder, role) if path.name in m.files)
        rows.append(("graph", f"{role:16s} {graph.file:22s} {size / 1e6:10.1f} MB"))
    rows.append(("files", f"{len(m.files)} files with their sizes as exported (checked on load)"))
    rows.append(("total", f"{folder_size(folder) / 1e6:.1f} MB"))
    rows.append(("providers", f"{', '.join(ort.get_available_providers())} (onnxruntime {ort.__version__})"))
    return rows


def _kernel_rows(m: Manifest) -> list[tuple[str, str]]:
    """The CPU kernels an int8/int4 CPU folder's export chose, if any."""
    kernels = m.quant.cpu_kernels
    if not kernels:
        return []
    where = f" on {kernels.cpu}" if kernels.cpu else ""
    rows = [("kernels", f"vision {kernels.vision}, prefill {kernels.prefill}, decode {kernels.decode} "
                        f"(chosen by {kernels.chosen_by}{where})")]
    if kernels.batch_decode_from:
        rows.append(("batches", f"decode steps of {kernels.batch_decode_from} or more rows on {kernels.prefill} "
                                "(decoder_prefill), measured faster there"))
    if kernels.sites:
        rows.append(("activations", f"int8, calibrated on {kernels.calibration}: each input within "
                                    f"{kernels.error_bound:g} relative error"))
        rows += [("inputs", site_summary(kernels, role)) for role in kernels.sites]
    return rows


def site_summary(kernels: CpuKernels, role: str) -> str:
    """One graph's inputs in a line: how many split off outlier channels or compute in float, and the
    largest errors with and without."""
    sites = kernels.sites[role]
    counts = kernels.site_counts(role)
    worst = max((s["error"] for s in sites.values()), default=0.0)
    plain = max((s["plain_error"] for s in sites.values()), default=0.0)
    channels = sum(s["outliers"] for s in sites.values())
    return (f"{role}: {counts['sites']} inputs, {counts['split']} with outlier channels split off ({channels} "
            f"channels in all), {counts['float']} in float; largest error {worst:.4f} ({plain:.4f} without)")


def verify_rows(folder: Path, m: Manifest) -> tuple[list[tuple[str, str]], list[str]]:
    """Hash every file: a row saying how it went, and the problems found."""
    problems = hash_problems(folder, m.files)
    if problems:
        return [("verified", f"FAILED: {'; '.join(problems)}")], problems
    return [("verified", f"all {len(m.files)} files match their SHA-256")], []
