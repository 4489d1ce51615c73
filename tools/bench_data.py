"""Loading a real-size ImageFolder: wall time and peak memory of ``load_dataset`` at 224x224, then one pass over
every split in batches, as the build's stages read them.

    python tools/bench_data.py [--images 10000] [--classes 5] [--size 224] [--dir /tmp/edgecompress-bench-data]
                               [--out FILE.json]

The folder (``--classes`` classes of 256x256 JPEGs, synthetic but varied: gradients, shapes and noise, each class
its own palette) is written once and reused while its ``.complete`` marker names the same count. The load runs in
a fresh process, so its peak resident memory (``ru_maxrss``) is the load's alone; the DataLoader's decoding
workers are its children and are reported apart. To measure another checkout (before a change), run with
``PYTHONPATH=/path/to/checkout``: the child imports edgecompress from there and records where from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIDE = 256
BATCH = 256

CHILD = r"""
import json, resource, sys, time
import numpy as np
import edgecompress
from edgecompress.data.datasets import SPLITS, load_dataset

data_dir, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
started = time.perf_counter()
data = load_dataset(data_dir, size)
loaded = time.perf_counter()
after_load_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
seen, checksum = 0, 0.0
for split in SPLITS:
    images, labels = data.split(split)
    for start in range(0, len(labels), batch):
        x = images[start:start + batch]
        checksum += float(x[:, :, ::16, ::16].sum())
        seen += len(x)
done = time.perf_counter()
print(json.dumps({
    "edgecompress": str(edgecompress.__file__),
    "images": seen,
    "image_size": data.preprocess.image_size,
    "split_sizes": {s: int(len(data.split(s)[1])) for s in SPLITS},
    "load_seconds": round(loaded - started, 1),
    "iterate_seconds": round(done - loaded, 1),
    "peak_rss_after_load_mb": round(after_load_mb),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "decode_workers_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    "checksum": round(checksum, 1),
}))
"""


def make_folder(root: Path, images: int, classes: int) -> Path:
    """``images`` 256x256 JPEGs in ``classes`` class folders (reused when already complete)."""
    import numpy as np
    from PIL import Image, ImageDraw

    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == f"{images} {classes}":
        return root
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    for index in range(images):
        cls = index % classes
        folder = root / f"class{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        base = np.stack([ramp * (60 + 40 * ((cls + c) % 3)) + 40 * c for c in range(3)], axis=-1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(noisy)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.integers(0, SIDE - 40, 2)
            x1, y1 = x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            (draw.ellipse if (index + cls) % 2 else draw.rectangle)((int(x0), int(y0), int(x1), int(y1)), fill=colour)
        img.save(folder / f"{index:05d}.jpg", quality=90)
    marker.write_text(f"{images} {classes}\n")
    return root


def measure(data_dir: Path, size: int) -> dict:
    """Load and iterate in a fresh process (cwd /, so only PYTHONPATH or the install decide what is imported)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), str(size), str(BATCH)], check=False, cwd="/",
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1],
                "exit_code": proc.returncode, "wall_seconds": round(time.perf_counter() - started, 1)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/edgecompress-bench-data"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    root = make_folder(args.dir / f"{args.images}x{args.classes}", args.images, args.classes)
    made = round(time.perf_counter() - started, 1)
    result = {
        "folder": str(root), "files": args.images, "classes": args.classes, "file_side": SIDE,
        "folder_bytes": sum(p.stat().st_size for p in root.rglob("*.jpg")), "make_folder_seconds": made,
        "batch": BATCH, "cores": os.cpu_count(), "pythonpath": os.environ.get("PYTHONPATH", ""),
        **measure(root, args.size),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
