"""Benchmark: `kubetune validate` (default mode) against a naive validator.

Writes a JSONL of about --size-mb MB (default 500) whose examples embed PNGs as
base64 data: URIs, then prints, from one run, the MB/s of

* ``kubetune validate FILE --json``, the real command in a subprocess (one core:
  it starts no threads or processes), and
* a naive validator: ``json.loads`` of every line and a full decode of every image
  (base64 decode, then PIL ``load()``), as a straightforward script would do.

The images look like photographs (smooth gradients, shapes and sensor-like
noise), because that is what VLM datasets hold and what PNG decoding costs on.
Target: at least 5x the naive validator and at least 150 MB/s.

    .venv/bin/python bench/validate.py [--size-mb N] [--keep]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

POOL = 48  # distinct images; lines cycle through them with distinct text


def photo_like_png(seed: int, size: tuple[int, int] = (448, 336)) -> bytes:
    rng = random.Random(seed)
    w, h = size
    bands = []
    for _ in range(3):
        a, b = rng.randrange(256), rng.randrange(256)
        gradient = Image.linear_gradient("L").resize((w, h)).rotate(rng.randrange(360))
        bands.append(gradient.point(lambda v, a=a, b=b: a + (b - a) * v // 255))
    im = Image.merge("RGB", bands)
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = rng.randrange(w), rng.randrange(h)
        r = rng.randrange(10, 90)
        fill = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(2))
    noise = Image.merge(
        "RGB", [Image.effect_noise((w, h), 10 + rng.randrange(10)) for _ in range(3)]
    )
    im = Image.blend(im, noise, 0.12)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def write_dataset(path: Path, size_mb: int) -> tuple[int, int]:
    uris = [
        "data:image/png;base64," + base64.b64encode(photo_like_png(i)).decode("ascii")
        for i in range(POOL)
    ]
    target = size_mb * 1_000_000
    written = lines = 0
    with path.open("w", encoding="utf-8") as fp:
        while written < target:
            i = lines
            images = [uris[i % POOL]] if i % 3 else [uris[i % POOL], uris[(i * 7 + 1) % POOL]]
            record = {
                "messages": [
                    {"role": "system", "content": "You describe photographs precisely."},
                    {
                        "role": "user",
                        "content": "<image>" * len(images) + f" Describe picture {i}.",
                    },
                    {
                        "role": "assistant",
                        "content": f"Picture {i} shows soft colour gradients and {i % 12 + 1} round shapes.",
                    },
                ],
                "images": images,
            }
            line = json.dumps(record) + "\n"
            fp.write(line)
            written += len(line)
            lines += 1
    return written, lines


def naive_validate(path: Path) -> int:
    """What a first script does: parse every line, decode every image fully."""
    images = 0
    with path.open(encoding="utf-8") as fp:
        for line in fp:
            record = json.loads(line)
            for uri in record.get("images", []):
                data = base64.b64decode(uri.split(",", 1)[1])
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                images += 1
    return images


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=500, help="size of the generated file")
    parser.add_argument("--dir", help="where to write it (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    args = parser.parse_args()

    folder = Path(args.dir or tempfile.mkdtemp(prefix="kubetune-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.jsonl"
    try:
        print(f"writing {args.size_mb} MB of JSONL with base64 PNGs to {path} ...", flush=True)
        size, lines = write_dataset(path, args.size_mb)
        mb = size / 1e6
        print(f"{mb:,.0f} MB, {lines:,} lines, ~{size // lines // 1000} kB a line")

        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "kubetune_trainer.cli", "validate", str(path), "--json"],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        fast_s = time.perf_counter() - start
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["valid"], (
            result.stdout[-2000:] + result.stderr[-2000:]
        )

        start = time.perf_counter()
        images = naive_validate(path)
        naive_s = time.perf_counter() - start
        assert images == report["images"], (images, report["images"])

        fast, naive = mb / fast_s, mb / naive_s
        print(f"{'validator':<36}{'seconds':>10}{'MB/s':>10}")
        print(f"{'kubetune validate (default mode)':<36}{fast_s:>10.2f}{fast:>10.0f}")
        print(f"{'naive (json.loads + full decode)':<36}{naive_s:>10.2f}{naive:>10.0f}")
        print(f"speed-up: {fast / naive:.1f}x  (targets: >= 5x and >= 150 MB/s)")
        return 0 if fast / naive >= 5 and fast >= 150 else 1
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            if not args.dir:
                folder.rmdir()


if __name__ == "__main__":
    sys.exit(main())
