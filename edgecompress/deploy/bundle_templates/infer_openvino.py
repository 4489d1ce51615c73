"""Classify images with this bundle's OpenVINO IR on the CPU.

    pip install openvino numpy pillow
    python infer_openvino.py image.png [more.png ...]

Needs only this directory: model.xml, model.bin, preprocess.json, labels.txt.
"""

import json
import sys
from pathlib import Path

import numpy as np
import openvino as ov
from PIL import Image

HERE = Path(__file__).resolve().parent


def preprocess(path, spec):
    size = spec["image_size"]
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) * spec["scale"]
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # NCHW, batch 1


def main(paths):
    spec = json.loads((HERE / "preprocess.json").read_text())
    labels = (HERE / "labels.txt").read_text().splitlines()
    compiled = ov.Core().compile_model(str(HERE / "model.xml"), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    for path in paths:
        logits = compiled(preprocess(path, spec))[0][0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = int(probs.argmax())
        print(f"{path}\t{labels[top]}\t{probs[top]:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
