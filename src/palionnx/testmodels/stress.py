"""Function-preserving outlier variants of a checkpoint: the same model, with real-style activation outliers.

Real PaliGemma checkpoints carry a few hidden channels whose activations after a norm are tens to hundreds
of times the others, and gated-MLP intermediates with a few huge channels; the small models trained here
have none, so they cannot show what int8 activations do to such a model. `stress_checkpoint` writes a copy
whose activations have them, without changing the function the checkpoint computes:

- every norm that feeds linear layers (Gemma's input and pre-MLP norms, SigLIP's two layer norms and its
  post-layernorm before the projector): the gain of `channels` of every 256 channels (c8: 3 %) times `alpha`,
  and the matching
  input columns of the layers reading that norm divided by `alpha` (the reverse of SmoothQuant's
  migration). Gemma's gain is 1 + w, so w becomes alpha * (1 + w) - 1; SigLIP's weight and bias scale;
- every gated MLP: as many of every 256 intermediate channels, up_proj rows times `alpha` and down_proj columns
  divided by `alpha` (gelu(gate) * up is linear in up);
- with `spikes`, activation spikes (a few tokens, a few channels): per layer, the `spikes` intermediate
  channels that are the most token-specific on probe scenes (the largest peak over mean magnitude: gelu
  keeps them near 0 on most tokens) are scaled the same way, so they become huge on the few tokens where
  they fire and stay small elsewhere.

With `alpha` a power of two the divided weights are exact, and fp32 exports give the base model's tokens
(tests/test_stress.py checks it). The final norm is left alone (it feeds the lm_head, tied to the embedding).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Tensors = dict[str, Any]  # name -> torch tensor


@dataclass(frozen=True)
class Stress:
    """How strong the outliers are and where: gain `alpha` on `channels` of every 256 channels of each norm and
    MLP intermediate, the vision tower too unless `vision` is False, and `spikes` token-specific MLP channels
    per layer."""

    alpha: float
    channels: int
    vision: bool = True
    spikes: int = 0
    seed: int = 0

    @property
    def name(self) -> str:
        """"a512c4", "a512c4-text" (decoder only), "a512c0s2" (spikes only)."""
        alpha = f"{self.alpha:g}"
        return f"a{alpha}c{self.channels}" + (f"s{self.spikes}" if self.spikes else "") + \
            ("" if self.vision else "-text")

    @classmethod
    def parse(cls, name: str) -> Stress:
        match = re.fullmatch(r"a(\d+(?:\.\d+)?)c(\d+)(?:s(\d+))?(-text)?", name)
        if not match:
            raise ValueError(f"unknown stress {name!r}: aALPHAcCHANNELS[sSPIKES][-text], e.g. a512c4 or a128c2s2-text")
        return cls(float(match[1]), int(match[2]), vision=not match[4], spikes=int(match[3] or 0))


def stress_checkpoint(source: Path, output: Path, stress: Stress,
                      spiky_channels: Callable[[Path, int], dict[int, list[int]]] | None = None) -> Path:
    """Write `source` with `stress`'s outliers to `output` (every other file copied as it is).

    `spiky_channels(source, count)` gives per decoder layer the most token-specific MLP channels (as
    `export.calibrate.spiky_channels` measures them); needed, and only called, when `stress.spikes`."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    output.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob("*.safetensors"))
    tensors: Tensors = {}
    owner: dict[str, Path] = {}
    for path in files:
        loaded = load_file(str(path))
        tensors.update(loaded)
        owner.update(dict.fromkeys(loaded, path))
    spikes: dict[int, list[int]] = {}
    if stress.spikes:
        if spiky_channels is None:  # measuring them takes the exporter, which stands above the test models
            raise ValueError("a stress with spikes needs spiky_channels: palionnx.export.calibrate.spiky_channels")
        spikes = spiky_channels(source, stress.spikes)
    with torch.no_grad():
        _stress_decoder(tensors, config["text_config"], stress, spikes)
        if stress.vision:
            _stress_vision(tensors, config["vision_config"], stress)
    for path in sorted(source.iterdir()):
        if path.suffix != ".safetensors" and path.is_file():
            shutil.copy2(path, output / path.name)
    for path in files:
        part = {name: tensor.contiguous() for name, tensor in tensors.items() if owner[name] == path}
        save_file(part, str(output / path.name), metadata={"format": "pt"})
    return output


def _channels(per_256: int, width: int, rng: np.random.Generator) -> list[int]:
    """`per_256` of every 256 of `width` channels (at least one when asked for any), drawn at random."""
    count = min(width, max(1, round(per_256 * width / 256))) if per_256 else 0
    return sorted(rng.choice(width, size=count, replace=False).tolist())


def _find(tensors: Tensors, tower: str, suffix: str) -> str:
    """The one tensor of `tower` ("language_model", or "vision_tower" with the projector) named `...suffix`
    (checkpoints prefix the language model differently)."""
    towers = (tower,) if tower == "language_model" else ("vision_tower", "multi_modal_projector")
    found = [name for name in tensors
             if (name == suffix or name.endswith("." + suffix)) and any(t in name for t in towers)]
    if len(found) != 1:
        raise ValueError(f"expected one tensor ending in {suffix!r}, found {len(found)}")
    return found[0]


def _stress_decoder(tensors: Tensors, text: dict[str, Any], stress: Stress, spikes: dict[int, list[int]]) -> None:
    """Gemma / Gemma 2: the input and pre-MLP norms, and the MLP intermediates."""
    rng = np.random.default_rng(stress.seed)
    hidden_channels = _channels(stress.channels, text["hidden_size"], rng)
    gemma2 = text.get("model_type") == "gemma2"
    pre_mlp = "pre_feedforward_layernorm" if gemma2 else "post_attention_layernorm"
    alpha = stress.alpha
    for layer in range(text["num_hidden_layers"]):
        base = f"layers.{layer}."
        for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              (pre_mlp, ("mlp.gate_proj", "mlp.up_proj"))):
            gain = tensors[_find(tensors, "language_model", f"{base}{norm}.weight")]
            gain[hidden_channels] = (alpha * (1.0 + gain[hidden_channels].float()) - 1.0).to(gain.dtype)
            for reader in readers:
                weight = tensors[_find(tensors, "language_model", f"{base}{reader}.weight")]
                weight[:, hidden_channels] /= alpha
        mlp = _channels(stress.channels, text["intermediate_size"], rng) + spikes.get(layer, [])
        up, down = (tensors[_find(tensors, "language_model", f"{base}mlp.{name}.weight")]
                    for name in ("up_proj", "down_proj"))
        up[mlp] *= alpha
        down[:, mlp] /= alpha


def _stress_vision(tensors: Tensors, vision: dict[str, Any], stress: Stress) -> None:
    """SigLIP: each layer's two layer norms (read by q/k/v and fc1) and the post-layernorm (read by the
    projector)."""
    rng = np.random.default_rng(stress.seed + 1)
    channels = _channels(stress.channels, vision["hidden_size"], rng)
    sites = []
    for layer in range(vision["num_hidden_layers"]):
        base = f"encoder.layers.{layer}."
        sites += [(f"{base}layer_norm1", [f"{base}self_attn.{p}_proj" for p in "qkv"]),
                  (f"{base}layer_norm2", [f"{base}mlp.fc1"])]
    sites.append(("post_layernorm", ["multi_modal_projector.linear"]))
    for norm, readers in sites:
        for part in ("weight", "bias"):
            tensors[_find(tensors, "vision_tower", f"{norm}.{part}")][channels] *= stress.alpha
        for reader in readers:
            tensors[_find(tensors, "vision_tower", f"{reader}.weight")][:, channels] /= stress.alpha
