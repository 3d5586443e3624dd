"""Train small PaliGemma checkpoints on the procedural scenes (`palionnx.testmodels.scenes`), on CPU.

    model = train(recipe, tokenizer, progress=print)

A run draws its training set once from the training stream (no evaluation scene is ever seen), renders it,
and trains in two stages on random batches of it:

1. Vision: the SigLIP tower and the projector learn what each grid cell holds (colour, kind and size of its
   shape, and the shape's rank in reading order, or nothing) and the background, through small linear heads
   that are then thrown away. A freshly initialised decoder otherwise learns the caption template long
   before it finds anything in random image features, and then learns to ignore the image (measured: exact
   match stays at 0 %). The rank tells the decoder which cell holds the k-th shape it must name: without
   it a 4-layer decoder skipped or repeated shapes far longer.
2. Captioning: PaliGemma's prefix-LM. The image tokens, `<bos>`, the prompt and `\\n` attend to each other
   bidirectionally (token type 0), the caption causally (type 1); the loss is on the caption and its `<eos>`
   only (the tied lm_head runs on those positions alone). A batch has one prompt (they alternate), so its
   rows have similar lengths and little padding is computed. The cell heads stay on as an auxiliary loss
   so the image features cannot collapse to a constant.

Training uses `THREADS` torch threads whatever the machine, so that a seed gives the same weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .scenes import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    MAX_SHAPES,
    POSITIONS,
    PROMPTS,
    SIZES,
    TRAIN_STREAM,
    Scene,
    random_scene,
    render,
    scene_rng,
)
from .synth import Geometry

Progress = Callable[[str], None]
# per cell: colour, kind, size, rank of the shape in reading order; class 0: an empty cell
CELL_CLASSES = (len(COLOURS) + 1, len(KINDS) + 1, len(SIZES) + 1, MAX_SHAPES + 1)
THREADS = 2


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a trained checkpoint: geometry, task and optimisation."""

    geometry: Geometry
    vision_steps: int  # stage 1
    steps: int  # stage 2
    batch_size: int
    lr: float
    vision_lr: float
    warmup: int
    scenes: int  # the training set
    aux_weight: float = 1.0  # weight of the cell loss during captioning
    weight_decay: float = 0.01
    seed: int = 0


@dataclass
class Batch:
    scenes: list[Scene]
    pixel_values: Any  # torch tensors from here on
    cells: Any  # [b, 9, 4]: CELL_CLASSES of each cell
    background: Any  # [b]
    input_ids: Any = None
    attention_mask: Any = None
    token_type_ids: Any = None
    labels: Any = None


class TrainingSet:
    """`count` scenes from the training stream, rendered once, with their per-cell labels."""

    def __init__(self, recipe: Recipe, rng: np.random.Generator):
        import torch

        self.scenes = [random_scene(rng) for _ in range(recipe.scenes)]
        size = recipe.geometry.image_size
        pixels = np.stack([np.asarray(render(s, size)) for s in self.scenes])  # uint8: a quarter of float32
        self.pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        cells = np.zeros((len(self.scenes), len(POSITIONS), len(CELL_CLASSES)), dtype=np.int64)
        for i, scene in enumerate(self.scenes):
            for rank, shape in enumerate(scene.shapes, start=1):  # shapes are in reading order
                cells[i, POSITIONS.index(shape.position)] = (
                    1 + list(COLOURS).index(shape.colour), 1 + KINDS.index(shape.kind), 1 + SIZES.index(shape.size),
                    rank)
        self.cells = torch.from_numpy(cells)
        self.background = torch.tensor([BACKGROUNDS.index(s.background) for s in self.scenes])

    def batch(self, rng: np.random.Generator, size: int) -> Batch:
        """`size` random scenes of the set."""
        pick = rng.integers(0, len(self.scenes), size)
        pixel_values = (self.pixels[pick].float() / 255.0 - 0.5) / 0.5  # as the runtime's preprocessing
        return Batch(scenes=[self.scenes[i] for i in pick], pixel_values=pixel_values, cells=self.cells[pick],
                     background=self.background[pick])


def add_captions(batch: Batch, geometry: Geometry, tokenizer: Any, prompt: str) -> Batch:
    """Fill the prefix-LM inputs of `batch` for `prompt`, right-padded."""
    import torch

    prefix = [geometry.image_token_id] * geometry.image_seq_length + [2] + tokenizer.encode(prompt + "\n").ids
    rows = [tokenizer.encode(scene.truth(prompt)).ids + [1] for scene in batch.scenes]  # <bos> = 2, <eos> = 1
    n, width = len(prefix), len(prefix) + max(len(row) for row in rows)
    batch.input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    batch.attention_mask = torch.zeros_like(batch.input_ids)
    batch.token_type_ids = torch.zeros_like(batch.input_ids)
    batch.labels = torch.full_like(batch.input_ids, -100)
    for i, suffix in enumerate(rows):
        m = len(suffix)
        batch.input_ids[i, : n + m] = torch.tensor(prefix + suffix)
        batch.attention_mask[i, : n + m] = 1
        batch.token_type_ids[i, n : n + m] = 1
        batch.labels[i, n : n + m] = torch.tensor(suffix)
    return batch


def caption_loss(model: Any, batch: Batch) -> Any:
    """Cross-entropy of the next token at the caption's positions only (Gemma 2's final soft-capping kept)."""
    import torch
    import torch.nn.functional as F

    hidden = model.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                         attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids,
                         use_cache=False).last_hidden_state
    labels = batch.labels[:, 1:]
    keep = labels != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    cap = getattr(model.config.text_config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, labels[keep])


class CellHeads:
    """Linear heads on the projected image features: per cell colour / kind / size / rank, and the background."""

    def __init__(self, hidden: int):
        import torch

        self.cells = torch.nn.Linear(hidden, sum(CELL_CLASSES))
        self.background = torch.nn.Linear(hidden, len(BACKGROUNDS))

    def parameters(self) -> list:
        return [*self.cells.parameters(), *self.background.parameters()]

    def loss(self, model: Any, batch: Batch) -> Any:
        import torch.nn.functional as F

        tower = model.model.vision_tower(batch.pixel_values).last_hidden_state
        features = model.model.multi_modal_projector(tower)  # [b, patches, hidden]
        labels = batch.cells[:, patch_cells(features.shape[1])]  # each patch learns what its cell holds
        logits = self.cells(features).split(CELL_CLASSES, dim=-1)
        loss = sum(F.cross_entropy(part.flatten(0, 1), labels[..., i].flatten()) for i, part in enumerate(logits))
        return loss + F.cross_entropy(self.background(features.mean(1)), batch.background)


def patch_cells(patches: int) -> list[int]:
    """The grid cell (0..8, reading order) of each image patch, for a square grid of `patches`."""
    side = math.isqrt(patches)
    return [(row * 3 // side) * 3 + col * 3 // side for row in range(side) for col in range(side)]


def learning_rate(peak: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def _optimizer(params: list, lr: float, weight_decay: float) -> Any:
    import torch

    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def train(recipe: Recipe, tokenizer: Any, progress: Progress | None = None,
          on_step: Callable[[int, Any], None] | None = None) -> Any:
    """Train a fresh PaliGemmaForConditionalGeneration (fp32, CPU) by `recipe`; deterministic for its seed.

    `on_step(step, model)` is called after every captioning step (for measurements while training).
    """
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    from .synth import make_config

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        torch.manual_seed(recipe.seed)
        model = PaliGemmaForConditionalGeneration(make_config(recipe.geometry)).train()
        heads = CellHeads(recipe.geometry.hidden)
        rng = scene_rng(recipe.seed, TRAIN_STREAM)
        clock = _Clock(progress)
        data = TrainingSet(recipe, rng)

        vision = [p for name, p in model.named_parameters() if "language_model" not in name] + heads.parameters()
        optimizer = _optimizer(vision, recipe.vision_lr, recipe.weight_decay)
        for step in range(recipe.vision_steps):
            _set_lr(optimizer, learning_rate(recipe.vision_lr, step, recipe.vision_steps, recipe.warmup))
            loss = heads.loss(model, data.batch(rng, recipe.batch_size))
            _update(optimizer, loss, vision)
            clock.report("vision", step, recipe.vision_steps, loss.item())

        everything = list(model.parameters()) + heads.parameters()
        optimizer = _optimizer(everything, recipe.lr, recipe.weight_decay)
        for step in range(recipe.steps):
            _set_lr(optimizer, learning_rate(recipe.lr, step, recipe.steps, recipe.warmup))
            batch = add_captions(data.batch(rng, recipe.batch_size), recipe.geometry, tokenizer,
                                 PROMPTS[step % len(PROMPTS)])
            loss = caption_loss(model, batch)
            if recipe.aux_weight:
                loss = loss + recipe.aux_weight * heads.loss(model, batch)
            _update(optimizer, loss, everything)
            clock.report("caption", step, recipe.steps, loss.item())
            if on_step:
                on_step(step, model)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _update(optimizer: Any, loss: Any, params: list) -> None:
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


class _Clock:
    """Progress lines every 50 steps: smoothed loss, wall and CPU seconds."""

    def __init__(self, progress: Progress | None):
        self.progress, self.smoothed = progress, 0.0
        self.wall, self.cpu = time.monotonic(), time.process_time()

    def report(self, stage: str, step: int, steps: int, loss: float) -> None:
        self.smoothed = loss if step == 0 else 0.9 * self.smoothed + 0.1 * loss
        if self.progress and (step % 50 == 0 or step == steps - 1):
            self.progress(f"{stage} step {step + 1}/{steps}  loss {self.smoothed:.4f}  "
                          f"{time.monotonic() - self.wall:.0f}s (cpu {time.process_time() - self.cpu:.0f}s)")
