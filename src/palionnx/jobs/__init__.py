"""Dataset jobs, the application between the runtime and its front ends: captioning folders of images
(`captioning.py`: the run loop; `plan.py`, `records.py`, `claims.py`, `files.py`; `ray_pipeline.py` for Ray),
their options (`options.py`) and checks (`checks.py`), and progress on a terminal (`progress.py`).

`cli/` parses options into these and prints; nothing here knows about typer or HTTP."""
