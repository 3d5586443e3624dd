"""The test models and their task: procedural scenes with known captions (`scenes.py`) and their scoring
(`evaluation.py`), random-weight checkpoints of real and tiny geometries (`synth.py`), the trained shapes models
(`train.py`, recipes and cache in `trained.py`) and their outlier variants (`stress.py`). Checkpoints are written
in transformers' format for `palionnx.export`; only synth, train and stress use torch, and only when called."""
