"""How well a model folder captions held-out scenes (`testmodels/scenes.py`): `palionnx eval` and the benchmarks.

Captions go through the normal runtime (`Captioner.caption`), greedy unless a sampler is given. Scores:

- exact match: the caption is the truth, character for character;
- token accuracy: generated tokens equal to the truth's tokens at the same place, over the longer of the two;
- per attribute: the caption is parsed with the scenes' grammar; count and background are right or wrong per
  scene; kind, colour, size and position are scored per true shape (a missing shape counts as wrong). With
  `caption en` shapes are matched by position; with `tags en` (no sizes or positions) by order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tokenizers import Tokenizer

from ..runtime.captioner import Captioner
from ..runtime.generate import Sampler
from .scenes import CAPTION_PROMPT, TAGS_PROMPT, Scene, make_scenes, read_caption, render

SHAPE_ATTRIBUTES = ("kind", "colour", "size", "position")
ATTRIBUTES = ("count", "background", *SHAPE_ATTRIBUTES)
SLACK_TOKENS = 8  # generated beyond the longest truth before a caption is cut off


@dataclass
class SceneScore:
    index: int
    truth: str
    caption: str
    exact: bool
    token_accuracy: float
    right: dict[str, int]  # attribute -> right answers in this scene
    asked: dict[str, int]  # attribute -> questions in this scene


@dataclass
class Report:
    folder: str
    prompt: str
    seed: int
    scenes: list[SceneScore] = field(default_factory=list)

    @property
    def exact_match(self) -> float:
        return sum(s.exact for s in self.scenes) / len(self.scenes)

    @property
    def token_accuracy(self) -> float:
        return sum(s.token_accuracy for s in self.scenes) / len(self.scenes)

    def attribute_accuracy(self) -> dict[str, float]:
        """Accuracy per attribute over all scenes (attributes the prompt does not ask about are left out)."""
        totals = {a: sum(s.asked.get(a, 0) for s in self.scenes) for a in ATTRIBUTES}
        return {a: sum(s.right.get(a, 0) for s in self.scenes) / n for a, n in totals.items() if n}

    def summary(self) -> dict:
        return {"folder": self.folder, "prompt": self.prompt, "seed": self.seed, "scenes": len(self.scenes),
                "exact_match": self.exact_match, "token_accuracy": self.token_accuracy,
                "attributes": self.attribute_accuracy()}

    def to_json(self) -> dict:
        return {**self.summary(), "results": [asdict(s) for s in self.scenes]}


def score_scene(index: int, scene: Scene, prompt: str, caption: str, tokens: list[int], truth_ids: list[int]
                ) -> SceneScore:
    """Score one caption against its scene."""
    truth = scene.truth(prompt)
    same = sum(a == b for a, b in zip(tokens, truth_ids))
    reading = read_caption(caption)
    right = {"count": int(reading.count == len(scene.shapes)),
             "background": int(reading.background == scene.background)}
    asked = {"count": 1, "background": 1}
    if prompt == TAGS_PROMPT:
        for i, shape in enumerate(scene.shapes):
            said = reading.tagged[i] if i < len(reading.tagged) else ("", "")
            right["colour"] = right.get("colour", 0) + int(said[0] == shape.colour)
            right["kind"] = right.get("kind", 0) + int(said[1] == shape.kind)
        asked.update(colour=len(scene.shapes), kind=len(scene.shapes))
    else:
        for shape in scene.shapes:
            size, colour, kind = reading.shapes.get(shape.position, ("", "", ""))
            for name, ok in (("position", bool(size)), ("size", size == shape.size),
                             ("colour", colour == shape.colour), ("kind", kind == shape.kind)):
                right[name] = right.get(name, 0) + int(ok)
        asked.update({name: len(scene.shapes) for name in SHAPE_ATTRIBUTES})
    return SceneScore(index=index, truth=truth, caption=caption, exact=caption == truth,
                      token_accuracy=same / max(len(tokens), len(truth_ids), 1), right=right, asked=asked)


def text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def evaluate(captioner: Captioner, count: int = 200, seed: int = 0, prompt: str = CAPTION_PROMPT,
             batch_size: int | None = None, max_new_tokens: int | None = None, sampler: Sampler | None = None,
             scenes: list[Scene] | None = None) -> Report:
    """Caption `count` held-out scenes (the evaluation stream for `seed`, or the given `scenes`) and score
    every caption.

    `max_new_tokens` defaults to the longest truth among the scenes plus `SLACK_TOKENS` (a caption that
    runs on past its truth is wrong either way)."""
    scenes = scenes if scenes is not None else make_scenes(count, seed)
    tokenizer = captioner.text.tokenizer
    truth_ids = [text_ids(tokenizer, scene.truth(prompt)) for scene in scenes]
    size = captioner.manifest.image_size
    results = captioner.caption([render(scene, size) for scene in scenes], prompt=prompt,
                                max_new_tokens=max_new_tokens or max(map(len, truth_ids)) + SLACK_TOKENS,
                                batch_size=batch_size, sampler=sampler)
    report = Report(folder=str(captioner.folder), prompt=prompt, seed=seed)
    for i, (scene, result, ids) in enumerate(zip(scenes, results, truth_ids)):
        report.scenes.append(score_scene(i, scene, prompt, result.text, result.tokens, ids))
    return report
