"""Image loading and SigLIP preprocessing with Pillow and numpy only.

`pixel_values` matches transformers' SiglipImageProcessor (PIL backend) on RGB images: bicubic resize of
the uint8 image, rescale by 1/255, normalise with the checkpoint's mean and std, channels first.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # what counts as an image file
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its pixels: square side, normalisation and resampling filter (from the manifest)."""

    size: int
    mean: list[float]
    std: list[float]
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"


@dataclass(frozen=True)
class Pixels:
    """An image already through `image_pixels` (in another process, say): values [3, size, size] float32."""

    values: np.ndarray
    source: str = "<pixels>"  # the name results carry


ImageInput = str | Path | Image.Image | Pixels


class ImageLoadError(Exception):
    """An input could not be read as an image; the message names the file and the reason."""


class LargeImageWarning(UserWarning):
    """An image above Pillow's decompression-bomb warning size (about 89 megapixels): decoded anyway."""


def load_image(source: str | Path | Image.Image | BinaryIO) -> Image.Image:
    """Open `source` (a path, a PIL image or an open binary file) and return an RGB image with EXIF
    orientation applied.

    Transparency (RGBA, LA, palette with transparency) is composited on white; CMYK, 16-bit and grey
    images are converted; an animated image gives its first frame.
    """
    name = str(source) if isinstance(source, (str, Path)) else "<PIL image>" if isinstance(source, Image.Image) \
        else "<upload>"
    try:
        image = source if isinstance(source, Image.Image) else _open(source, name)
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{name}: too large to decode safely ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for unreadable / truncated / non-images
        reason = re.sub(r" <_io\.\w+ object at 0x[0-9a-f]+>", "", str(exc))  # no object reprs for uploads
        raise ImageLoadError(f"{name}: not a readable image ({reason})") from exc


def _open(source: str | Path | BinaryIO, name: str) -> Image.Image:
    """Decode the first frame. Pillow's two-line DecompressionBombWarning becomes one LargeImageWarning
    in palionnx's words; beyond twice that size Pillow refuses (DecompressionBombError)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        with Image.open(source) as opened:
            opened.seek(0)
            opened.load()
            image = opened.copy()
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        warnings.warn(LargeImageWarning(f"{name}: a very large image ({image.width}x{image.height}, "
                                        f"{image.width * image.height / 1e6:.0f} megapixels): decoded anyway"),
                      stacklevel=3)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale the full range to 8 bits rather than clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pixel_values(
    images: list[Image.Image],
    size: int,
    mean: list[float],
    std: list[float],
    rescale_factor: float = 1 / 255,
    resample: str = "bicubic",
) -> np.ndarray:
    """RGB images -> float32 array [n, 3, size, size], as SiglipImageProcessor computes it."""
    mean_arr = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_arr = np.asarray(std, dtype=np.float32)[:, None, None]
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        resized = image.resize((size, size), RESAMPLE[resample])
        array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) * np.float32(rescale_factor)
        batch[i] = (array - mean_arr) / std_arr
    return batch


def image_pixels(source: str | Path | Image.Image | BinaryIO, spec: ImageSpec) -> np.ndarray:
    """The whole CPU stage for one image: load, EXIF orientation, RGB, resize, normalise -> [3, size, size].

    Raises ImageLoadError naming the file when it cannot be read.
    """
    image = load_image(source)
    return pixel_values([image], spec.size, spec.mean, spec.std, spec.rescale_factor, spec.resample)[0]
