"""How closely a model folder follows a reference folder of the same checkpoint, on any images.

    reference = Captioner.load("models/ft-fp32")
    run = reference_run(reference, images, max_new_tokens=64)          # its captions and logits
    report = agreement(Captioner.load("models/ft-int4"), run)
    report.summary(), report.worst(3)

What `palionnx eval FOLDER --reference REF [IMAGES...]` and `palionnx bench --reference REF` report: for each
image, whether the folder's greedy caption is the reference's (exact match), the share of positions where
the two token sequences agree, and, feeding the reference's own tokens to both (teacher forcing), the share
of positions where the folder's next token is the reference's and the mean cosine of their logits. The last
two move with every perturbation a quant level makes, even where the captions still agree: they say how far
a level strays on the user's own model and images, without a ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .runtime.captioner import Captioner, source_name
from .runtime.defaults import DEFAULT_PROMPT
from .runtime.preprocess import ImageInput


def forced_logits(captioner: Captioner, images: Sequence[ImageInput], tokens: list[list[int]], prompt: str,
                  batch: int = 8) -> list[np.ndarray]:
    """Per image, the logits [len(tokens), vocab] along its `tokens`: position p is fed token p - 1 (position 0
    follows the prompt), whatever the model would have picked. Rows of a batch are fed in step; a row past
    its own tokens is fed its last one again, and those extra logits are dropped."""
    out = []
    for start in range(0, len(images), batch):
        forced = tokens[start : start + batch]
        pixels = np.stack([_pixels(captioner, image) for image in images[start : start + batch]])
        prompts = captioner.prompt_batch(pixels, [prompt] * len(forced))
        longest = max(map(len, forced))
        state = captioner.model.new_state(len(forced), prompts.input_ids.shape[1] + longest)
        rows = [state.prefill(prompts).logits().astype(np.float32)]
        for position in range(longest - 1):
            feed = np.array([row[min(position, len(row) - 1)] for row in forced], dtype=np.int64)
            rows.append(state.step(feed).logits().astype(np.float32))
        logits = np.stack(rows, axis=1)
        out += [logits[i, : len(row)] for i, row in enumerate(forced)]
    return out


def _pixels(captioner: Captioner, image: ImageInput) -> np.ndarray:
    loaded = captioner.load_pixels(image)
    if isinstance(loaded, Exception):
        raise loaded
    return loaded


@dataclass
class ReferenceRun:
    """The reference's greedy captions of some images (at most `max_new_tokens` each), their tokens (with the
    stop token where it stopped: what teacher forcing feeds) and its logits along them."""

    folder: str
    images: Sequence[ImageInput]
    prompt: str
    max_new_tokens: int
    captions: list[str]
    generated: list[list[int]]
    tokens: list[list[int]]
    logits: list[np.ndarray]


def reference_run(reference: Captioner, images: Sequence[ImageInput], prompt: str = DEFAULT_PROMPT,
                  max_new_tokens: int = 64, batch_size: int | None = None) -> ReferenceRun:
    """Caption `images` with the reference (greedy) and keep its logits along its own captions."""
    results = reference.caption(images, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)
    failed = [r for r in results if not r.ok]
    if failed:
        raise ValueError(f"{failed[0].source}: {failed[0].error}")
    eos = reference.manifest.eos_token_ids[0]
    tokens = [r.tokens + [eos] if len(r.tokens) < max_new_tokens else r.tokens for r in results]
    return ReferenceRun(str(reference.folder), images, prompt, max_new_tokens, [r.text for r in results],
                        [r.tokens for r in results], tokens, forced_logits(reference, images, tokens, prompt))


@dataclass
class ImageAgreement:
    """One image: the two captions, and how far the folder agrees with the reference on it."""

    source: str
    caption: str
    reference_caption: str
    same_caption: bool
    token_agreement: float  # generated tokens equal at the same place, over the longer sequence
    forced_agreement: float  # teacher-forced: next token = the reference's
    forced_cosine: float  # teacher-forced: mean cosine of the logits


@dataclass
class Agreement:
    folder: str
    reference: str
    prompt: str
    images: list[ImageAgreement] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Means over the images, and the share of captions equal to the reference's."""
        n = len(self.images)
        return {"folder": self.folder, "reference": self.reference, "images": n,
                "exact_match": sum(i.same_caption for i in self.images) / n,
                "token_agreement": sum(i.token_agreement for i in self.images) / n,
                "forced_agreement": sum(i.forced_agreement for i in self.images) / n,
                "forced_cosine": sum(i.forced_cosine for i in self.images) / n}

    def worst(self, count: int = 3) -> list[ImageAgreement]:
        """The images where the folder strays furthest (lowest teacher-forced cosine first)."""
        return sorted(self.images, key=lambda i: (i.forced_cosine, i.forced_agreement))[:count]

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "results": [asdict(i) for i in self.images]}


def agreement(captioner: Captioner, run: ReferenceRun, batch_size: int | None = None) -> Agreement:
    """How `captioner` agrees with the reference `run` on the run's images (same prompt and length limit)."""
    results = captioner.caption(run.images, prompt=run.prompt, max_new_tokens=run.max_new_tokens,
                                batch_size=batch_size)
    logits = forced_logits(captioner, run.images, run.tokens, run.prompt)
    report = Agreement(str(captioner.folder), run.folder, run.prompt)
    for image, result, caption, reference, ref_logits, got in zip(run.images, results, run.captions, run.generated,
                                                                  run.logits, logits):
        same = sum(a == b for a, b in zip(result.tokens, reference))
        cosine = (ref_logits * got).sum(-1) / np.linalg.norm(ref_logits, axis=-1) / np.linalg.norm(got, axis=-1)
        report.images.append(ImageAgreement(
            source=source_name(image), caption=result.text, reference_caption=caption,
            same_caption=result.tokens == reference,
            token_agreement=same / max(len(result.tokens), len(reference), 1),
            forced_agreement=float((ref_logits.argmax(-1) == got.argmax(-1)).mean()),
            forced_cosine=float(cosine.mean())))
    return report
