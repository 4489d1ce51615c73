"""Classify images with this bundle's OpenVINO IR on the CPU.

    pip install openvino numpy pillow
    python infer_openvino.py image.png [more.png ...]

Needs only this directory: model.xml, model.bin, preprocess.json, runtime.json, labels.txt.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import openvino as ov
from PIL import Image

HERE = Path(__file__).resolve().parent


def preprocess(path, spec):
    """By preprocess.json: resize to floor(image_size / crop_pct) (both sides for "squash", the shorter one for
    "center", keeping the aspect), keep the centre image_size square, normalise."""
    size = spec["image_size"]
    target = max(size, math.floor(size / spec.get("crop_pct", 1.0)))
    filter_name = spec.get("interpolation", spec.get("resize", "bilinear"))  # older files name the filter in resize
    img = Image.open(path).convert("RGB")
    width, height = img.size
    if spec.get("resize") == "center":
        new = (target, int(target * height / width)) if width <= height else (int(target * width / height), target)
    else:
        new = (target, target)
    if new != img.size:
        img = img.resize(new, getattr(Image.Resampling, filter_name.upper()))
    left, top = round((new[0] - size) / 2.0), round((new[1] - size) / 2.0)
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) * spec["scale"]
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # NCHW, batch 1


def main(paths):
    spec = json.loads((HERE / "preprocess.json").read_text())
    labels = (HERE / "labels.txt").read_text().splitlines()
    config = {"PERFORMANCE_HINT": "LATENCY"}
    threads = json.loads((HERE / "runtime.json").read_text()).get("threads")  # what the latency was measured on
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(HERE / "model.xml"), "CPU", config)
    for path in paths:
        logits = compiled(preprocess(path, spec))[0][0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = int(probs.argmax())
        print(f"{path}\t{labels[top]}\t{probs[top]:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
