"""The storage the manifests in examples/ and examples/demo/ name, on the local stack:
``.venv/bin/python hack/example_storage.py [NAMESPACE]`` (``hack/dev.sh up`` runs it
for ``default``; the examples test calls ``provide`` for its own namespace).

No model hub is reachable here, so the base model the examples name is the tiny
random-weight Qwen2.5-VL-style model (hack/tiny.py) on the ``models`` claim. The
``datasets`` claim holds the colours x shapes images: the demo's train and held-out
sets, and the preference pairs with their own image folder that
examples/dataset-pvc.yaml names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from local_kubelet import volume_claim  # noqa: E402
from tiny_models import COLOURS, SHAPES, tiny_model, write_shapes_dataset  # noqa: E402
from training.support import with_rejected  # noqa: E402

BASE_MODEL = "tiny-qwen2.5-vl"
CLAIMS = ("models", "datasets")


def provide(models: Path, datasets: Path) -> None:
    """Fill the ``models`` and ``datasets`` claims' folders; rerunning rewrites the same
    bytes (every dataset is seeded)."""
    shutil.copytree(tiny_model("qwen2_5_vl"), models / BASE_MODEL, dirs_exist_ok=True)
    write_shapes_dataset(datasets / "shapes", 16, seed=1, name="train.jsonl")
    write_shapes_dataset(datasets / "shapes", 6, seed=2, name="held_out.jsonl")
    classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    captions = datasets / "captions"
    for name, per_class, seed in (("prefs", 4, 3), ("prefs-val", 1, 4)):
        chats = write_shapes_dataset(captions, per_class, seed=seed, name=f"{name}.chats")
        with_rejected(chats, captions / f"{name}.jsonl", classes, seed=seed)
        chats.unlink()
        # The example names `imageRoot: captions/images`, so its lines name the images
        # relative to that folder.
        pairs = captions / f"{name}.jsonl"
        lines = [json.loads(line) for line in pairs.read_text().splitlines()]
        for line in lines:
            line["images"] = [Path(p).name for p in line["images"]]
        pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))


def main(argv: list[str]) -> int:
    namespace = argv[0] if argv else "default"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    volumes = ROOT / ".cache" / "dev" / "state" / "pvc" / namespace
    provide(volumes / "models", volumes / "datasets")
    claims = [obj for c in CLAIMS for obj in volume_claim(namespace, c, volumes / c)]
    listing = json.dumps({"apiVersion": "v1", "kind": "List", "items": claims})
    subprocess.run(["kubectl", "apply", "-f", "-"], input=listing, text=True, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
