"""Synthetic test images for validation and benchmarks (numpy + Pillow only: no dataset, no download)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def sample_images(count: int = 4, size: int = 96) -> list[Image.Image]:
    """Deterministic test images: gradients, stripes, blocks and noise (no dataset needed)."""
    rng = np.random.default_rng(1234)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            array = np.stack([x, y, 1 - x], axis=-1)
        elif kind == 1:
            array = np.stack([(np.sin(x * 20 + i) > 0) * 1.0, y, x * y], axis=-1)
        elif kind == 2:
            array = np.kron(rng.random((6, 6, 3)), np.ones((size // 6 + 1, size // 6 + 1, 1)))[:size, :size]
        else:
            array = rng.random((size, size, 3))
        images.append(Image.fromarray((array * 255).astype(np.uint8), "RGB"))
    return images


def _main() -> None:
    """`python -m palionnx.samples FOLDER [COUNT]`: write COUNT (default 4) sample PNGs to try captioning."""
    import sys
    from pathlib import Path

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m palionnx.samples FOLDER [COUNT]")
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(sample_images(int(sys.argv[2]) if len(sys.argv) == 3 else 4, size=224)):
        image.save(folder / f"sample{i}.png")
    print(f"wrote {i + 1} sample images to {folder}")


if __name__ == "__main__":
    _main()
