"""Procedural scenes with known captions: the task the trained test models learn (numpy + Pillow only).

A scene is a textured background and one or two shapes (MAX_SHAPES), each in its own cell of a 3 x 3 grid.
A shape has a kind, a colour and a size; its cell names its position. The truth for a scene comes from a small grammar,
in the origin model's style (tags, then a description), chosen by the prompt:

    tags en      two shapes, red circle, blue square, striped background
    caption en   the tags, then: an image of two shapes on a striped background. a large red circle is
                 at the top left. a small blue square is at the center.

Shapes are listed in reading order (row by row). No two shapes of a scene share both kind and colour.
Everything is drawn from a seeded numpy generator, so `make_scenes(n, seed)` gives the same scenes on
every machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "blue": (40, 90, 225), "purple": (150, 60, 190), "white": (250, 250, 250), "black": (15, 15, 15),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "grid")
NUMBERS = ("one", "two", "three", "four")
OUTLINE, OUTLINE_WIDTH = (20, 20, 20), 3  # every shape has a dark outline (drawn at twice the size)
MAX_SHAPES = 2  # per scene: with 3, a 4-layer decoder needed more than twice the training (see testmodels/trained.py)

TAGS_PROMPT = "tags en"
CAPTION_PROMPT = "caption en"
PROMPTS = (CAPTION_PROMPT, TAGS_PROMPT)
TEMPLATE_WORDS = ("shape", "shapes", "background", "an", "image", "of", "on", "a", "is", "at", "the", "en")

TRAIN_STREAM, EVAL_STREAM = 1, 2  # separate random streams: evaluation scenes are never trained on


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str
    dx: float = 0.0  # offset of the centre from its cell's centre, in cell widths
    dy: float = 0.0
    scale: float = 1.0  # size jitter
    tint: tuple[int, int, int] = (0, 0, 0)  # colour jitter


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    base: tuple[int, int, int]  # background colour
    detail: tuple[int, int, int]  # the texture's darker colour

    @property
    def count(self) -> str:
        n = len(self.shapes)
        return f"{NUMBERS[n - 1]} shape{'s' if n > 1 else ''}"

    def tags(self) -> str:
        """Comma-separated tags: the count, each shape's colour and kind, the background."""
        parts = [self.count] + [f"{s.colour} {s.kind}" for s in self.shapes] + [f"{self.background} background"]
        return ", ".join(parts)

    def description(self) -> str:
        """One sentence on the whole scene, then one per shape."""
        sentences = [f"an image of {self.count} on a {self.background} background."]
        sentences += [f"a {s.size} {s.colour} {s.kind} is at the {s.position}." for s in self.shapes]
        return " ".join(sentences)

    def truth(self, prompt: str = CAPTION_PROMPT) -> str:
        """The right caption for `prompt`: tags for `tags en`, tags then the description for `caption en`."""
        if prompt == TAGS_PROMPT:
            return self.tags()
        if prompt == CAPTION_PROMPT:
            return f"{self.tags()}, {self.description()}"
        raise ValueError(f"the scenes know the prompts {', '.join(PROMPTS)}, not {prompt!r}")


def vocabulary() -> list[str]:
    """Every word the grammar and the prompts use (each gets its own tokenizer piece)."""
    words = [*KINDS, *COLOURS, *SIZES, *BACKGROUNDS, *NUMBERS, *TEMPLATE_WORDS]
    words += [w for position in POSITIONS for w in position.split()]
    return list(dict.fromkeys(words))


def first_words() -> list[str]:
    """The words a text can start with: a caption's count, a prompt's first word."""
    return [*NUMBERS, *(prompt.split()[0] for prompt in PROMPTS)]


def random_scene(rng: np.random.Generator, max_shapes: int = MAX_SHAPES) -> Scene:
    """Draw a scene: 1..max_shapes shapes in distinct cells, distinct (kind, colour) pairs."""
    count = int(rng.integers(1, max_shapes + 1))
    cells = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
    pairs = rng.choice(len(KINDS) * len(COLOURS), size=count, replace=False).tolist()
    colours = list(COLOURS)
    shapes = []
    for cell, pair in zip(cells, pairs):
        shapes.append(Shape(
            kind=KINDS[pair // len(COLOURS)], colour=colours[pair % len(COLOURS)],
            size=SIZES[int(rng.integers(len(SIZES)))], position=POSITIONS[cell],
            dx=float(rng.uniform(-0.04, 0.04)), dy=float(rng.uniform(-0.04, 0.04)),
            scale=float(rng.uniform(0.88, 1.12)),
            tint=tuple(int(v) for v in rng.integers(-20, 21, size=3)),  # type: ignore[arg-type]
        ))
    base = np.clip(rng.uniform(110, 180) + rng.uniform(-25, 25, size=3), 0, 255)
    detail = base - rng.uniform(25, 45)
    return Scene(
        shapes=tuple(shapes), background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        base=tuple(int(v) for v in base), detail=tuple(int(v) for v in detail),  # type: ignore[arg-type]
    )


def render(scene: Scene, size: int) -> Image.Image:
    """Draw `scene` as a size x size RGB image (drawn at twice the size, then averaged down)."""
    big = 2 * size
    image = Image.fromarray(_background(scene, big), "RGB")
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for shape in scene.shapes:
        row, col = divmod(POSITIONS.index(shape.position), 3)
        centre = ((col + 0.5 + shape.dx) * cell, (row + 0.5 + shape.dy) * cell)
        # small 0.19-0.25 of a cell, large 0.28-0.36: close enough that quantization noise shows in the sizes
        radius = cell * (0.32 if shape.size == "large" else 0.22) * shape.scale
        colour = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[shape.colour], shape.tint))
        _draw_shape(draw, shape.kind, centre, radius, colour)
    return image.resize((size, size), Image.Resampling.BOX)


def _background(scene: Scene, size: int) -> np.ndarray:
    """The background texture as a uint8 array [size, size, 3]: each grid cell holds two periods of it."""
    y, x = np.mgrid[0:size, 0:size] * 6 / size  # in periods
    fx, fy = x % 1, y % 1
    masks = {
        "plain": np.zeros((size, size), dtype=bool),
        "striped": (x + y) % 1 < 0.5,
        "checkered": (x // 1 + y // 1) % 2 == 1,
        "dotted": (fx - 0.5) ** 2 + (fy - 0.5) ** 2 < 0.07,
        "grid": (fx < 0.15) | (fy < 0.15),
    }
    mask = masks[scene.background]
    return np.where(mask[..., None], np.array(scene.detail), np.array(scene.base)).astype(np.uint8)


_CORNERS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "diamond": [(0, -1), (0.8, 0), (0, 1), (-0.8, 0)],
    "triangle": [(0, -1), (0.95, 0.8), (-0.95, 0.8)],
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1), (-0.3, 0.3),
              (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
}


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, centre: tuple[float, float], radius: float,
                colour: tuple[int, ...]) -> None:
    """A filled shape with a dark outline (which makes its kind visible whatever its colour)."""
    cx, cy = centre
    if kind == "circle":
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(box, fill=colour, outline=OUTLINE, width=OUTLINE_WIDTH)
    else:
        points = [(cx + radius * u, cy + radius * v) for u, v in _CORNERS[kind]]
        draw.polygon(points, fill=colour, outline=OUTLINE, width=OUTLINE_WIDTH)


def scene_rng(seed: int, stream: int = EVAL_STREAM) -> np.random.Generator:
    """The generator of a stream of scenes (`TRAIN_STREAM` or `EVAL_STREAM`) for `seed`."""
    return np.random.default_rng([stream, seed])


def make_scenes(count: int, seed: int = 0, max_shapes: int = MAX_SHAPES, stream: int = EVAL_STREAM) -> list[Scene]:
    """`count` scenes from the stream's generator: the same list for the same arguments, everywhere."""
    rng = scene_rng(seed, stream)
    return [random_scene(rng, max_shapes) for _ in range(count)]


@dataclass
class Reading:
    """What a caption says about a scene, as far as it can be parsed (missing parts are None / empty)."""

    count: int | None
    background: str | None
    shapes: dict[str, tuple[str, str, str]]  # position -> (size, colour, kind), from the description
    tagged: list[tuple[str, str]]  # (colour, kind) from the tags


_WORD = {
    "number": "|".join(NUMBERS), "size": "|".join(SIZES), "colour": "|".join(COLOURS), "kind": "|".join(KINDS),
    "position": "|".join(sorted(POSITIONS, key=len, reverse=True)), "background": "|".join(BACKGROUNDS),
}
_COUNT = re.compile(r"\b({number}) shapes?\b".format(**_WORD))
_BACKGROUND = re.compile(r"\b({background}) background\b".format(**_WORD))
_SENTENCE = re.compile(r"\ba ({size}) ({colour}) ({kind}) is at the ({position})\.".format(**_WORD))
_TAG = re.compile(r"(?:^|, )({colour}) ({kind})(?=,|$)".format(**_WORD))


def read_caption(text: str) -> Reading:
    """Parse a caption written in the scenes' grammar (tolerant: unparsable parts are left out)."""
    count = _COUNT.search(text)
    background = _BACKGROUND.search(text)
    shapes = {m.group(4): (m.group(1), m.group(2), m.group(3)) for m in _SENTENCE.finditer(text)}
    tags_part = text.split(", an image of", 1)[0]
    return Reading(
        count=NUMBERS.index(count.group(1)) + 1 if count else None,
        background=background.group(1) if background else None,
        shapes=shapes,
        tagged=[(m.group(1), m.group(2)) for m in _TAG.finditer(tags_part)],
    )
