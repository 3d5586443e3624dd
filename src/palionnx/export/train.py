"""Train small PaliGemma checkpoints on the procedural scenes (`palionnx.scenes`), on CPU.

    model = train(recipe, tokenizer, progress=print)

Two stages, both on fresh scenes from the training stream (no evaluation scene is ever seen):

1. Vision: the SigLIP tower and the projector learn what each grid cell holds (colour, kind and size of its
   shape, or nothing) and the background, through small linear heads that are then thrown away. A freshly
   initialised decoder otherwise learns the caption template long before it finds anything in random
   image features, and it then learns to ignore the image (measured: exact match stays at 0 %).
2. Captioning: PaliGemma's prefix-LM. The image tokens, `<bos>`, the prompt and `\\n` attend to each other
   bidirectionally (token type 0), the caption causally (type 1); the loss is on the caption and its `<eos>`.
   The cell heads stay on as an auxiliary loss so the image features cannot collapse to a constant.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..scenes import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
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
CELL_CLASSES = (len(COLOURS) + 1, len(KINDS) + 1, len(SIZES) + 1)  # class 0: an empty cell


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
    max_shapes: int
    curriculum: int = 0  # stage-2 steps over which the most shapes per scene grows from 1 to max_shapes
    aux_weight: float = 1.0  # weight of the cell loss during captioning
    weight_decay: float = 0.01
    seed: int = 0


@dataclass
class Batch:
    scenes: list[Scene]
    pixel_values: Any  # torch tensors from here on
    cells: Any  # [b, 9, 3] class of each cell's colour, kind, size
    background: Any  # [b]
    input_ids: Any = None
    attention_mask: Any = None
    token_type_ids: Any = None
    labels: Any = None


def image_batch(recipe: Recipe, rng: np.random.Generator, max_shapes: int) -> Batch:
    """`batch_size` fresh scenes: pixel values (as the runtime makes them) and per-cell labels."""
    import torch

    scenes = [random_scene(rng, max_shapes) for _ in range(recipe.batch_size)]
    pixels = np.stack([np.asarray(render(s, recipe.geometry.image_size), dtype=np.float32) for s in scenes])
    cells = np.zeros((len(scenes), len(POSITIONS), 3), dtype=np.int64)
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            cells[i, POSITIONS.index(shape.position)] = (
                1 + list(COLOURS).index(shape.colour), 1 + KINDS.index(shape.kind), 1 + SIZES.index(shape.size))
    return Batch(
        scenes=scenes,
        pixel_values=torch.from_numpy((pixels / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous(),
        cells=torch.from_numpy(cells),
        background=torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
    )


def add_captions(batch: Batch, geometry: Geometry, tokenizer: Any, rng: np.random.Generator) -> Batch:
    """Fill the prefix-LM inputs of `batch`, right-padded, each scene with a random prompt."""
    import torch

    rows = []
    for scene in batch.scenes:
        prompt = PROMPTS[int(rng.integers(len(PROMPTS)))]
        prefix = [geometry.image_token_id] * geometry.image_seq_length + [2] + tokenizer.encode(prompt + "\n").ids
        rows.append((prefix, tokenizer.encode(scene.truth(prompt)).ids + [1]))  # <bos> = 2, <eos> = 1
    width = max(len(p) + len(s) for p, s in rows)
    batch.input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    batch.attention_mask = torch.zeros_like(batch.input_ids)
    batch.token_type_ids = torch.zeros_like(batch.input_ids)
    batch.labels = torch.full_like(batch.input_ids, -100)
    for i, (prefix, suffix) in enumerate(rows):
        n, m = len(prefix), len(suffix)
        batch.input_ids[i, : n + m] = torch.tensor(prefix + suffix)
        batch.attention_mask[i, : n + m] = 1
        batch.token_type_ids[i, n : n + m] = 1
        batch.labels[i, n : n + m] = torch.tensor(suffix)
    return batch


class CellHeads:
    """Linear heads on the projected image features: per cell colour / kind / size, and the background."""

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


def shapes_at(recipe: Recipe, step: int) -> int:
    """The most shapes per scene at captioning step `step` (the curriculum)."""
    if step >= recipe.curriculum:
        return recipe.max_shapes
    return 1 + (recipe.max_shapes - 1) * step // recipe.curriculum


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

    torch.manual_seed(recipe.seed)
    model = PaliGemmaForConditionalGeneration(make_config(recipe.geometry)).train()
    heads = CellHeads(recipe.geometry.hidden)
    rng = scene_rng(recipe.seed, TRAIN_STREAM)
    clock = _Clock(progress)

    vision = [p for name, p in model.named_parameters() if "language_model" not in name] + heads.parameters()
    optimizer = _optimizer(vision, recipe.vision_lr, recipe.weight_decay)
    for step in range(recipe.vision_steps):
        _set_lr(optimizer, learning_rate(recipe.vision_lr, step, recipe.vision_steps, recipe.warmup))
        loss = heads.loss(model, image_batch(recipe, rng, recipe.max_shapes))
        _update(optimizer, loss, vision)
        clock.report("vision", step, recipe.vision_steps, loss.item())

    everything = list(model.parameters()) + heads.parameters()
    optimizer = _optimizer(everything, recipe.lr, recipe.weight_decay)
    for step in range(recipe.steps):
        _set_lr(optimizer, learning_rate(recipe.lr, step, recipe.steps, recipe.warmup))
        batch = add_captions(image_batch(recipe, rng, shapes_at(recipe, step)), recipe.geometry, tokenizer, rng)
        loss = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                     token_type_ids=batch.token_type_ids, labels=batch.labels).loss
        if recipe.aux_weight:
            loss = loss + recipe.aux_weight * heads.loss(model, batch)
        _update(optimizer, loss, everything)
        clock.report("caption", step, recipe.steps, loss.item())
        if on_step:
            on_step(step, model)
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
