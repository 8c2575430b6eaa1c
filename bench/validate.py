"""Benchmark: `kubetune validate` (default mode) against a naive validator, on two
kinds of data.

For each kind it writes a JSONL of embedded base64 PNGs, then prints the MB/s of

* ``kubetune validate FILE --json``, the real command in a subprocess (one core:
  it starts no threads or processes), start-up included; the start-up alone (the
  command on a three-line file) is printed too, as is the rate without it;
* a naive validator: ``json.loads`` of every line and a full decode of every image
  (base64 decode, then PIL ``load()``), as a straightforward script would do;
* the floor: reading the file and hashing it with sha256, which any validator that
  reports the file's hash must do (in this process, no start-up).

The kinds:

* ``photo``: photograph-like 448x336 PNGs (smooth gradients, shapes and sensor-like
  noise) in the placeholder style, ``images`` beside ``messages``. They compress well,
  so a naive validator spends its time inflating them. Target: at least 5x the naive
  validator and at least 150 MB/s.
* ``noise``: 192x192 PNGs of random noise as content parts (``image_url``). Noise does
  not compress, so the naive validator's decode is cheap and the time goes to what
  every validator must do: parsing the JSON and passing over the base64. Target: at
  least 3x the naive validator and at least 250 MB/s.

Each is timed once, or with ``--repeat N`` in N rounds of all three, keeping the
shortest time of each: on a machine shared with other work, the least disturbed.
``--profile N`` then runs the command once more in this process under cProfile and
prints its N costliest functions (own time) for each kind of data.

    .venv/bin/python bench/validate.py [--data photo|noise|both] [--size-mb N] [--repeat N]
                                       [--profile N]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import hashlib
import io
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def noise_png(seed: int, size: tuple[int, int] = (192, 192)) -> bytes:
    rng = random.Random(seed)
    im = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def photo_records() -> Iterator[dict[str, Any]]:
    """Placeholder style: one or two images a line."""
    uris = [data_uri(photo_like_png(i)) for i in range(POOL)]
    i = 0
    while True:
        images = [uris[i % POOL]] if i % 3 else [uris[i % POOL], uris[(i * 7 + 1) % POOL]]
        yield {
            "messages": [
                {"role": "system", "content": "You describe photographs precisely."},
                {"role": "user", "content": "<image>" * len(images) + f" Describe picture {i}."},
                {
                    "role": "assistant",
                    "content": f"Picture {i} shows soft colour gradients and {i % 12 + 1} round shapes.",
                },
            ],
            "images": images,
        }
        i += 1


def noise_records() -> Iterator[dict[str, Any]]:
    """Content-part style: one to three images a line."""
    uris = [data_uri(noise_png(i)) for i in range(POOL)]
    i = 0
    while True:
        parts: list[dict[str, Any]] = [{"type": "text", "text": f"Describe picture {i}."}]
        parts += [
            {"type": "image_url", "image_url": {"url": uris[(i * 7 + j) % POOL]}}
            for j in range(1 + i % 3)
        ]
        yield {
            "messages": [
                {"role": "system", "content": "You describe images."},
                {"role": "user", "content": parts},
                {"role": "assistant", "content": f"Picture {i} is noise, pattern {i % 12}."},
            ]
        }
        i += 1


@dataclass(frozen=True)
class Kind:
    name: str
    records: Callable[[], Iterator[dict[str, Any]]]
    default_mb: int
    min_speedup: float
    min_mb_s: float


KINDS = {
    "photo": Kind("photo", photo_records, 500, 5, 150),
    "noise": Kind("noise", noise_records, 300, 3, 250),
}


def write_dataset(path: Path, records: Iterator[dict[str, Any]], size_mb: int) -> tuple[int, int]:
    target = size_mb * 1_000_000
    written = lines = 0
    with path.open("w", encoding="utf-8") as fp:
        for record in records:
            if written >= target:
                break
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
            uris = list(record.get("images", []))
            for message in record["messages"]:
                if isinstance(message["content"], list):
                    uris += [
                        part["image_url"]["url"]
                        for part in message["content"]
                        if part["type"] == "image_url"
                    ]
            for uri in uris:
                data = base64.b64decode(uri.split(",", 1)[1])
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                images += 1
    return images


def read_and_hash(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(4 << 20)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fp:
        while size := fp.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


@dataclass(frozen=True)
class Result:
    kind: Kind
    mb: float
    ours_s: float
    naive_s: float
    floor_s: float
    startup_s: float

    @property
    def ours(self) -> float:
        return self.mb / self.ours_s

    @property
    def naive(self) -> float:
        return self.mb / self.naive_s

    @property
    def floor(self) -> float:
        return self.mb / self.floor_s

    @property
    def without_startup(self) -> float:
        return self.mb / (self.ours_s - self.startup_s)

    @property
    def ok(self) -> bool:
        return self.ours / self.naive >= self.kind.min_speedup and self.ours >= self.kind.min_mb_s

    def verdict(self) -> str:
        return (
            f"{self.kind.name}: {self.ours / self.naive:.1f}x the naive validator, "
            f"{self.ours:.0f} MB/s ({self.without_startup:.0f} MB/s less start-up, "
            f"{self.without_startup / self.floor:.0%} of the read + sha256 floor of "
            f"{self.floor:.0f} MB/s); targets >= {self.kind.min_speedup:g}x and "
            f">= {self.kind.min_mb_s:g} MB/s: {'met' if self.ok else 'MISSED'}"
        )


def validate_command(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.cli", "validate", str(path), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def startup(folder: Path) -> float:
    """The command's time on a file of three short lines: its start-up, the best of 3."""
    path = folder / "bench-startup.jsonl"
    line = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]
    }
    path.write_text((json.dumps(line) + "\n") * 3, encoding="utf-8")
    try:
        return min(timed(lambda: validate_command(path))[0] for _ in range(3))
    finally:
        path.unlink()


def profile(path: Path, top: int) -> None:
    """The command's own time by function, run in this process once it has run on a
    small file (so without its imports and first-use costs)."""
    from kubetune_trainer import cli

    small = path.with_name("bench-profile-warm-up.jsonl")
    with path.open("rb") as fp:
        small.write_bytes(b"".join(fp.readline() for _ in range(3)))
    profiler = cProfile.Profile()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["validate", str(small), "--json"])
            profiler.runcall(cli.main, ["validate", str(path), "--json"])
    finally:
        small.unlink()
    print(f"\nprofile of kubetune validate on {path.name} (cProfile, own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def measure(kind: Kind, folder: Path, size_mb: int, repeat: int, top: int = 0) -> Result:
    path = folder / f"bench-{kind.name}.jsonl"
    print(f"writing {size_mb} MB of {kind.name} JSONL to {path} ...", flush=True)
    size, lines = write_dataset(path, kind.records(), size_mb)
    mb = size / 1e6
    print(f"{mb:,.0f} MB, {lines:,} lines, ~{size // lines // 1000} kB a line")

    # Rounds of all three, the shortest time of each kept: on a shared machine the
    # shortest is the one least disturbed by other work.
    ours_s = naive_s = floor_s = float("inf")
    for _ in range(repeat):
        seconds, result = timed(lambda: validate_command(path))
        ours_s = min(ours_s, seconds)
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["valid"], (
            result.stdout[-2000:] + result.stderr[-2000:]
        )
        seconds, images = timed(lambda: naive_validate(path))
        naive_s = min(naive_s, seconds)
        assert images == report["images"], (images, report["images"])
        seconds, digest = timed(lambda: read_and_hash(path))
        floor_s = min(floor_s, seconds)
        assert digest == report["sha256"]
    if top:
        profile(path, top)
    return Result(kind, mb, ours_s, naive_s, floor_s, startup(folder))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=(*KINDS, "both"), default="both", help="which data")
    parser.add_argument(
        "--size-mb", type=int, help="size of each generated file (default: photo 500, noise 300)"
    )
    parser.add_argument("--dir", help="where to write them (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument(
        "--repeat", type=int, default=1, help="time each N times and keep the shortest"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile the command in this process and print its N costliest functions",
    )
    args = parser.parse_args()

    kinds = list(KINDS.values()) if args.data == "both" else [KINDS[args.data]]
    folder = Path(args.dir or tempfile.mkdtemp(prefix="kubetune-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for kind in kinds:
            results.append(
                measure(kind, folder, args.size_mb or kind.default_mb, args.repeat, args.profile)
            )
    finally:
        if not args.keep:
            for kind in kinds:
                (folder / f"bench-{kind.name}.jsonl").unlink(missing_ok=True)
            if not args.dir:
                folder.rmdir()

    print(f"\n{'data':<7}{'validator':<38}{'seconds':>9}{'MB/s':>8}")
    for r in results:
        print(
            f"{r.kind.name:<7}{'kubetune validate (default mode)':<38}{r.ours_s:>9.2f}{r.ours:>8.0f}"
        )
        print(f"{'':<7}{'naive (json.loads + full decode)':<38}{r.naive_s:>9.2f}{r.naive:>8.0f}")
        print(f"{'':<7}{'floor (read + sha256, no start-up)':<38}{r.floor_s:>9.2f}{r.floor:>8.0f}")
        print(f"{'':<7}{'kubetune validate start-up alone':<38}{r.startup_s:>9.2f}")
    for r in results:
        print(r.verdict())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
