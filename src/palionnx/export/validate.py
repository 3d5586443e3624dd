"""Compare an exported folder with transformers on the same checkpoint.

Reports greedy token agreement over a few images and the max |logit difference| at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..runtime.captioner import Captioner
from ..runtime.defaults import DEFAULT_PROMPT
from ..samples import sample_images


@dataclass
class ValidationReport:
    """How closely the exported folder follows transformers."""

    sequences: int
    exact_sequences: int  # generated sequences identical to transformers' generate()
    token_agreement: float  # fraction of positions equal up to the shorter sequence
    first_token_agreement: float
    max_prefill_logit_diff: float

    def summary(self) -> str:
        return (
            f"greedy sequences identical to transformers: {self.exact_sequences}/{self.sequences}; "
            f"token agreement {self.token_agreement:.1%}; first token {self.first_token_agreement:.0%}; "
            f"max |logit diff| at prefill {self.max_prefill_logit_diff:.2e}"
        )


def load_reference(source: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(transformers model, processor) of a checkpoint folder or hub id, loaded as export loads it."""
    from transformers import AutoProcessor

    from .checkpoint import load_paligemma, resolve_source

    folder, _, _ = resolve_source(source)
    return load_paligemma(folder, dtype), AutoProcessor.from_pretrained(folder)


def reference_generate(
    model: Any, processor: Any, images: list[Image.Image], prompts: list[str], max_new_tokens: int,
    **generate_kwargs: Any,
) -> tuple[list[list[int]], np.ndarray]:
    """Greedy transformers output: (generated ids per image without padding/eos, prefill logits)."""
    import torch

    inputs = processor(images=images, text=["<image>" + p for p in prompts], return_tensors="pt",
                       padding="longest")
    with torch.no_grad():
        prefill = model(**inputs).logits[:, -1].float().numpy()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    sequences = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        sequences.append(row[:cut])
    return sequences, prefill


def validate(source: str | Path, folder: str | Path, images: list[Image.Image] | None = None,
             prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 16) -> ValidationReport:
    """Run transformers and the exported folder on the same images and compare."""
    images = images or sample_images()
    prompts = [prompt] * len(images)
    model, processor = load_reference(source)
    expected, ref_logits = reference_generate(model, processor, images, prompts, max_new_tokens)
    del model

    captioner = Captioner.load(folder, device="cpu")
    logits = captioner.prefill_logits(images, prompts)
    results = captioner.caption(images, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=len(images))

    agree = total = first = exact = 0
    for result, ref in zip(results, expected):
        exact += result.tokens == ref
        first += bool(result.tokens[:1] == ref[:1])
        pairs = list(zip(result.tokens, ref))
        agree += sum(a == b for a, b in pairs)
        total += max(len(pairs), 1)
    return ValidationReport(
        sequences=len(images),
        exact_sequences=exact,
        token_agreement=agree / total,
        first_token_agreement=first / len(images),
        max_prefill_logit_diff=float(np.abs(logits - ref_logits).max()),
    )
