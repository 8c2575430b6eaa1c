"""Fit images to the pixel budget before the processor sees them, and keep them fitted
for later epochs."""

from __future__ import annotations

import hashlib
import heapq
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from PIL import Image

from kubetune_trainer.contract.job import DatasetLimits, TrainingConfig
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


LOW_DETAIL_PIXELS: Final = 512 * 512
"""OpenAI's vision fine-tuning shows a ``detail: low`` image at 512 x 512."""


def pixel_budget(detail: str | None, max_pixels: int) -> int:
    """The most pixels an image with this content-part ``detail`` keeps: a low-detail
    one at most LOW_DETAIL_PIXELS, any other the run's maxPixels."""
    return min(max_pixels, LOW_DETAIL_PIXELS) if detail == "low" else max_pixels


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


# A process keeps fitted images in at most 1/CACHE_SHARE of its memory limit, and in
# at most CACHE_CAP bytes. Forked dataloader workers share what the main process kept
# while planning (which opens every image), but each process may keep more of its own,
# so at worst the main process and its train and eval workers (five processes on a GPU)
# hold this much each: under a third of the pod's memory.
CACHE_SHARE: Final = 16
CACHE_CAP: Final = 8 << 30

CacheKey = tuple[str, bytes, int]
"""(image root, digest of the image's source, pixel budget): one file seen at two
details is two fitted images, unless both details give it the same budget."""

CGROUP_LIMITS: Final = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
"""Where a container's memory limit is read: cgroup v2, then v1."""


def memory_limit() -> int:
    """The memory this process may use: its cgroup's limit where one is set, else the
    machine's."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in CGROUP_LIMITS:
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # v2 writes "max" when there is no limit
            return min(int(text), physical)
    return physical


def default_cache_budget() -> int:
    return min(memory_limit() // CACHE_SHARE, CACHE_CAP)


class FittedImages:
    """Fitted images kept for later epochs, within ``budget`` bytes.

    When they do not all fit, the images that took the longest to open and fit for
    the memory they hold are kept: a large or slow image (a progressive JPEG near the
    scan limit) is then decoded once per run, and a small cheap one again when it is
    met again. Each process keeps its own: a pickled copy (a dataloader worker that is
    spawned rather than forked) starts empty."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = default_cache_budget() if budget is None else budget
        self.used = 0
        self._images: dict[CacheKey, tuple[Image.Image, int]] = {}
        self._cheapest: list[tuple[float, CacheKey]] = []  # heap of (seconds per byte, key)

    def __reduce__(self) -> tuple[type[FittedImages], tuple[int]]:
        return type(self), (self.budget,)

    def get(self, key: CacheKey) -> Image.Image | None:
        entry = self._images.get(key)
        return entry[0] if entry else None

    def put(self, key: CacheKey, image: Image.Image, seconds: float) -> None:
        size = image.width * image.height * 4  # PIL holds an RGB pixel in 4 bytes
        worth = seconds / size
        victims: list[tuple[float, CacheKey]] = []
        freed = 0
        while (
            self.used - freed + size > self.budget
            and self._cheapest
            and self._cheapest[0][0] < worth
        ):
            victims.append(heapq.heappop(self._cheapest))
            freed += self._images[victims[-1][1]][1]
        if self.used - freed + size > self.budget:
            for victim in victims:
                heapq.heappush(self._cheapest, victim)
            return
        for _, old in victims:
            del self._images[old]
        self._images[key] = (image, size)
        self.used += size - freed
        heapq.heappush(self._cheapest, (worth, key))


@dataclass(frozen=True)
class ImageRules:
    """What a run's images may be, as validation approved them: each data file's
    Dataset limits, by the image root its records carry, and the folder its remote
    images were fetched to before it started (``TrainingConfig.remoteImages``)."""

    limits: Mapping[str, DatasetLimits] = field(default_factory=dict)
    fetched: str | None = None

    def limits_for(self, root: str) -> DatasetLimits:
        return self.limits.get(root) or DatasetLimits()


def image_root(root: str | None, dataset: str) -> Path:
    """Where a data file's relative image paths resolve."""
    # Not resolved here: the image-root guard must see a symlinked folder to refuse it.
    return Path(root) if root else Path(dataset).absolute().parent


def run_image_rules(config: TrainingConfig) -> ImageRules:
    """The rules of the images of a run's training and validation files."""
    files = [(image_root(config.image_root, config.dataset), config.dataset_limits)]
    validation = config.validation
    if validation is not None and validation.dataset is not None:
        files.append((image_root(validation.image_root, validation.dataset), validation.limits))
    return image_rules(files, config.remote_images)


def image_rules(files: Sequence[tuple[Path, DatasetLimits]], fetched: str | None) -> ImageRules:
    """The rules of a run that reads each (image root, limits) of ``files``. Two
    Datasets with one image root (they share a folder) get the looser of their limits
    there: each was validated under its own, and an image may serve both."""
    limits: dict[str, DatasetLimits] = {}
    for root, file_limits in files:
        key = str(root)
        known = limits.get(key)
        limits[key] = (
            file_limits
            if known is None
            else known.model_copy(
                update={
                    "max_image_bytes": max(known.max_image_bytes, file_limits.max_image_bytes),
                    "allow_remote_images": known.allow_remote_images
                    or file_limits.allow_remote_images,
                }
            )
        )
    return ImageRules(limits, fetched)


@dataclass(frozen=True)
class ImageFitter:
    """Opens a dataset image under its Dataset's rules (root confinement, size, pixel
    and scan caps, remote images only where fetched before the run) and fits it to the
    pixel budget of its ``detail`` (``pixel_budget``): the collator's ImageLoader.
    Planning opens every image once, and each epoch's batches open them again, so
    fitted images are kept (``FittedImages``) and a run decodes each once while they
    fit in memory. A class, not a closure, so that dataloader worker processes can
    receive it."""

    max_pixels: int
    rules: ImageRules = field(default_factory=ImageRules)
    cache: FittedImages = field(default_factory=FittedImages, compare=False, repr=False)

    def __call__(self, source: str, root: str, line: int, detail: str | None = None) -> Image.Image:
        budget = pixel_budget(detail, self.max_pixels)
        # A data: URI can be megabytes long: its digest is the key, not the text.
        key = (root, hashlib.blake2b(source.encode("utf-8", "surrogatepass")).digest(), budget)
        fitted = self.cache.get(key)
        if fitted is None:
            started = time.perf_counter()
            fetched = Path(self.rules.fetched) if self.rules.fetched else None
            image = open_image(
                ImageRef(source),
                Path(root),
                self.rules.limits_for(root),
                fetched=fetched,
                line=line,
            )
            fitted = fit_to_max_pixels(image, budget)
            self.cache.put(key, fitted, time.perf_counter() - started)
        return fitted
