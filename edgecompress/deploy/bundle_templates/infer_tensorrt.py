"""Classify images with this bundle's TensorRT engine, on the Jetson (TensorRT 10 Python API).

    ./build_engine.sh                      # once, on the device: model.onnx -> model.plan
    pip install numpy pillow cuda-python   # tensorrt comes with JetPack
    python infer_tensorrt.py image.png [more.png ...]

Needs only this directory: model.plan, preprocess.json, labels.txt.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import tensorrt as trt
from cuda import cudart
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


def check(result):
    err, *rest = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def main(paths):
    spec = json.loads((HERE / "preprocess.json").read_text())
    labels = (HERE / "labels.txt").read_text().splitlines()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((HERE / "model.plan").read_bytes())
    context = engine.create_execution_context()
    input_name, output_name = spec["input_name"], spec["output_name"]
    shape = (1, 3, spec["image_size"], spec["image_size"])
    context.set_input_shape(input_name, shape)  # the ONNX batch axis is dynamic; run batch 1
    out_shape = tuple(context.get_tensor_shape(output_name))
    host_out = np.empty(out_shape, dtype=np.float32)
    d_in = check(cudart.cudaMalloc(int(np.prod(shape)) * 4))
    d_out = check(cudart.cudaMalloc(host_out.nbytes))
    stream = check(cudart.cudaStreamCreate())
    context.set_tensor_address(input_name, int(d_in))
    context.set_tensor_address(output_name, int(d_out))
    h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    try:
        for path in paths:
            x = preprocess(path, spec)
            check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, stream))
            if not context.execute_async_v3(stream):
                raise RuntimeError("TensorRT inference failed")
            check(cudart.cudaMemcpyAsync(host_out.ctypes.data, d_out, host_out.nbytes, d2h, stream))
            check(cudart.cudaStreamSynchronize(stream))
            logits = host_out[0]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = int(probs.argmax())
            print(f"{path}\t{labels[top]}\t{probs[top]:.4f}")
    finally:
        cudart.cudaFree(d_in)
        cudart.cudaFree(d_out)
        cudart.cudaStreamDestroy(stream)


if __name__ == "__main__":
    main(sys.argv[1:])
