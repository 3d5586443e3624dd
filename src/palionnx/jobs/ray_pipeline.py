"""`palionnx caption --ray`: the same captioning as a Ray Data pipeline, for datasets beyond one machine.

Images are read and resized in parallel by CPU tasks, captioned by a pool of actors that each load the
model once, and written by the actors as the CLI writes them (atomic, never over an existing caption, so a
retried batch after a worker died writes nothing twice). The driver plans the run (skips, collisions)
and keeps the progress, the summary and --jsonl exactly as a single-process run does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.defaults import DEFAULT_BATCH_SIZE, DEFAULT_CUDA_BATCH_SIZE
from ..runtime.limits import check_request
from ..runtime.manifest import Manifest
from ..runtime.preprocess import ImageSpec
from ..runtime.text import TextCodec
from .captioning import caption_stream, per_image, publish
from .options import CaptionOptions, RayOptions
from .plan import Plan, recording
from .records import Record, Summary


def require_ray() -> None:
    """Raise ImportError with the install command when Ray Data is missing."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("--ray needs Ray Data: pip install 'palionnx[ray]' (on every node of the cluster)") from None


def load_row(row: dict[str, Any], spec: ImageSpec) -> dict[str, Any]:
    """CPU stage: the runtime's `image_pixels` for one image, or the reason it cannot be read."""
    from ..runtime.preprocess import ImageLoadError, image_pixels

    try:
        row["pixels"], row["error"] = image_pixels(row["image"], spec), ""
    except ImageLoadError as exc:
        row["pixels"], row["error"] = np.zeros((3, spec.size, spec.size), dtype=np.float32), str(exc)
    return row


class CaptionActor:
    """One model load per actor; captions a batch of decoded images and writes their caption files."""

    def __init__(self, folder: str, device: str, options: CaptionOptions, threads: int | None):
        from ..runtime.captioner import Captioner

        self.captioner = Captioner.load(folder, device=device, threads=threads)
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..runtime.captioner import CaptionResult
        from ..runtime.preprocess import Pixels

        options = self.options
        good = [(i, Pixels(batch["pixels"][i], str(batch["image"][i])))
                for i, error in enumerate(batch["error"]) if not error]
        # as a plain run: --min-words and --captions-per-image included
        results = dict(per_image(caption_stream(self.captioner, good, options), options.captions_per_image))
        records = []
        for i, path in enumerate(batch["image"]):
            captions = results.get(i) or [CaptionResult(source=str(path), error=str(batch["error"][i]))]
            for result in captions:
                result.source = str(path)
            records.append(publish(captions, Path(batch["target"][i]), options, exclusive=not options.recaptions))
        return {"record": np.array([asdict(r) for r in records], dtype=object)}


def caption_with_ray(plan: Plan, folder: Path, options: CaptionOptions, ray_options: RayOptions, device: str = "auto",
                     quiet: bool = False, say: Callable[[str], None] | None = None) -> Summary:
    """Caption the plan's images on Ray (`ray_options.address`: "local" starts Ray on this machine, "auto"
    joins the running cluster, or a cluster address). Same outputs, summary and --jsonl as
    `captioning.caption_files`. The prompt and the context are checked here, once (RequestError), before
    any actor loads the model; then `say` hears where it runs.

    Ray places actors by the CPUs and GPUs they request: workers x cpus_per_worker must leave CPU on each
    node for the image-reading tasks (0.5 CPU each), or reading waits forever behind the actors.
    """
    import ray

    manifest = Manifest.load(folder)
    check_request(manifest, TextCodec(folder, manifest), [options.prompt], options.max_new_tokens,
                  options.batch_size or 1)
    started = time.perf_counter()
    address, workers, gpus_per_worker = ray_options.address, ray_options.workers, ray_options.gpus_per_worker
    cpus_per_worker = ray_options.cpus_per_worker
    if say:
        say(f"model {folder} on Ray ({address}): {workers} worker(s), {gpus_per_worker} GPU each")
    # CPU actors run onnxruntime on as many threads as Ray reserved cores for them, so actors sharing a
    # node do not oversubscribe it; GPU actors keep onnxruntime's default.
    threads = None if gpus_per_worker else max(1, round(cpus_per_worker))
    spec = manifest.image_spec
    with recording(plan, options, started, quiet) as recorder:
        if plan.todo:
            ray.init(address=None if address == "local" else address, ignore_reinit_error=True,
                     log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
            for name in ("ray", "ray.data"):  # the CLI reports progress itself
                logging.getLogger(name).setLevel(logging.WARNING)
            ray.data.DataContext.get_current().enable_progress_bars = False
            rows = [{"image": str(job.image), "target": str(plan.targets[job])} for job in plan.todo]
            dataset = ray.data.from_items(rows).map(
                partial(load_row, spec=spec), num_cpus=0.5
            ).map_batches(
                CaptionActor, fn_constructor_args=(str(folder), device, options, threads),
                batch_size=options.batch_size or (DEFAULT_CUDA_BATCH_SIZE if gpus_per_worker else DEFAULT_BATCH_SIZE),
                concurrency=workers, num_gpus=gpus_per_worker,
                num_cpus=cpus_per_worker,
                max_restarts=-1, max_task_retries=-1,  # a killed worker is restarted and its batch retried
            )
            for row in dataset.iter_rows():
                recorder.add(Record(**row["record"]))
    return plan.summary
