"""Fit images to the pixel budget before the processor sees them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from kubetune_trainer.data import open_image
from kubetune_trainer.data.example import ImageRef


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode. Transparent pixels become white, as most viewers show them,
    rather than the arbitrary colour PIL's plain convert() leaves under them."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")  # CMYK, P, L, 1, I;16, YCbCr, ...


def fit_to_max_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """An RGB copy whose width x height is at most ``max_pixels``, aspect ratio kept."""
    image = to_rgb(image)
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    # Flooring keeps the product within budget; a side below one pixel becomes one,
    # and then the other side is capped so a very thin image still fits.
    new_w, new_h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    new_w = min(new_w, max_pixels // new_h)
    new_h = min(new_h, max_pixels // new_w)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class ImageFitter:
    """Opens a dataset image under the dataset rules (root confinement, size caps, no
    remote URLs) and fits it to ``max_pixels``: the collator's ImageLoader. A class,
    not a closure, so that dataloader worker processes can receive it."""

    max_pixels: int

    def __call__(self, source: str, root: str, line: int) -> Image.Image:
        return fit_to_max_pixels(
            open_image(ImageRef(source), Path(root), line=line), self.max_pixels
        )
