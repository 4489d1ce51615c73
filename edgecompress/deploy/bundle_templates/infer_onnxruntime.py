"""Classify images with this bundle's ONNX model in ONNX Runtime.

    pip install onnxruntime numpy pillow
    python infer_onnxruntime.py image.png [more.png ...]

Needs only this directory: model.onnx, preprocess.json, labels.txt.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
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
    session = ort.InferenceSession(str(HERE / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for path in paths:
        logits = session.run(None, {name: preprocess(path, spec)})[0][0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = int(probs.argmax())
        print(f"{path}\t{labels[top]}\t{probs[top]:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
