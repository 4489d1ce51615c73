"""The deployment bundle: what an application team needs to run the model, and a reviewer to trust it.

``bundle/`` in the run directory holds the artifact, ``labels.txt``,
``preprocess.json``, inference examples for the runtime, ``build_engine.sh``
for TensorRT targets, and ``manifest.json`` with the sha256 of every file, the
target, the runtime and its version, the precision, the tool version and the
exact command. ``verify_bundle`` and ``predict`` work from the bundle's own
files alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np

from edgecompress import __version__
from edgecompress.core.errors import BundleError, UsageError
from edgecompress.core.fsutil import atomic_path, sha256_file, write_json
from edgecompress.targets import known_runtimes, runtime_class

TEMPLATES = Path(__file__).parent / "bundle_templates"
MANIFEST = "manifest.json"
RUNTIME_SETTINGS = "runtime.json"


def make_bundle(out: Path, *, artifact: Path, runtime_name: str, runtime_version: str, target_name: str,
                precision: str, class_names, preprocess: dict, command: str, deploy_notes: dict,
                archive: bool = False, threads: int | None = None) -> Path:
    """Write ``out`` (atomically): artifact, labels, preprocessing, runtime settings, examples, manifest.

    ``threads``: the runtime's inference threads the artifact was timed on (None: the runtime's own choice), in
    runtime.json, which the examples apply."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for f in artifact.parent.iterdir():  # model.onnx, or model.xml + model.bin
            if f.is_file() and f.name != "stage.json":
                shutil.copy2(f, tmp / f.name)
        (tmp / "labels.txt").write_text("".join(f"{name}\n" for name in class_names))
        write_json(tmp / "preprocess.json", {**preprocess, "input_name": "input", "output_name": "logits"})
        write_json(tmp / RUNTIME_SETTINGS, {"threads": threads,
                                            "threads_note": "inference threads the latency was measured with; null: "
                                                            "the runtime's own choice (a thread per core)"})
        for example in runtime_class(runtime_name).bundle_examples:
            shutil.copy2(TEMPLATES / example, tmp / example)
        if "build_command" in deploy_notes:
            script = tmp / "build_engine.sh"
            script.write_text("#!/bin/sh\n# Build the TensorRT engine on the Jetson itself (engines are tied to the GPU and TensorRT version).\n"
                              "set -e\ncd \"$(dirname \"$0\")\"\n" + deploy_notes["build_command"] + "\n")
            script.chmod(0o755)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        write_json(tmp / MANIFEST, {
            "format": "edgecompress-bundle/1",
            "artifact": artifact.name,
            "target": target_name,
            "runtime": runtime_name,
            "runtime_version": runtime_version,
            "precision": precision,
            "tool_version": __version__,
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        })
    if archive:
        with atomic_path(out.with_suffix(".tar.gz")) as tmp_archive:
            with tarfile.open(tmp_archive, "w:gz") as tar:
                tar.add(out, arcname=out.name)
    return out


def read_manifest(bundle: Path) -> dict:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} is not a directory")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"bundle {bundle} has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
        manifest["files"], manifest["runtime"], manifest["artifact"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle {bundle}: {MANIFEST} is malformed ({exc})") from exc
    if manifest["runtime"] not in known_runtimes():
        raise BundleError(f"bundle {bundle}: unknown runtime {manifest['runtime']!r} in {MANIFEST}")
    return manifest


def check_files(bundle: Path, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        if os.path.basename(name) != name:
            raise BundleError(f"bundle {bundle}: {MANIFEST} names a file outside the bundle: {name!r}")
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"bundle {bundle} is incomplete: {name} is missing")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle {bundle}: {name} does not match its sha256 in {MANIFEST} (modified?)")


def open_session(bundle: Path, manifest: dict):
    """The artifact loaded by its runtime's class (TensorRT's QDQ ONNX runs in ONNX Runtime here)."""
    artifact = bundle / manifest["artifact"]
    try:
        return runtime_class(manifest["runtime"])(None).session(artifact)
    except Exception as exc:  # the runtimes raise their own types for a corrupt model
        raise BundleError(f"bundle {bundle}: {artifact.name} does not load in {manifest['runtime']}: "
                          f"{str(exc).splitlines()[0][:200]}") from exc


def verify_bundle(bundle: Path) -> dict:
    """sha256 of every file, then load the artifact and run one input through it."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    check_files(bundle, manifest)
    spec = json.loads((bundle / "preprocess.json").read_text())
    session = open_session(bundle, manifest)
    size = spec["image_size"]
    logits = session(np.zeros((1, 3, size, size), np.float32))
    labels = (bundle / "labels.txt").read_text().splitlines()
    if logits.shape != (1, len(labels)):
        raise BundleError(f"bundle {bundle}: the model outputs {logits.shape[1:]} scores for {len(labels)} labels")
    return {"bundle": str(bundle), "files": len(manifest["files"]), "runtime": manifest["runtime"],
            "target": manifest["target"], "precision": manifest["precision"], "ok": True}


def preprocess_image(path: Path, spec: dict) -> np.ndarray:
    """One image as the model's batch-1 input, by the bundle's preprocess.json."""
    from edgecompress.data.datasets import Preprocess, _normalise, _read_image

    pre = Preprocess.from_dict(spec)
    arr = _read_image(Path(path), pre)
    if arr is None:
        raise UsageError(f"cannot read image {path}")
    return _normalise(arr[None], pre)


def predict(bundle: Path, images: list[Path], top_k: int = 1) -> list[dict]:
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    check_files(bundle, manifest)
    spec = json.loads((bundle / "preprocess.json").read_text())
    labels = (bundle / "labels.txt").read_text().splitlines()
    session = open_session(bundle, manifest)
    results = []
    for path in images:
        logits = session(preprocess_image(path, spec))[0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)[:top_k]
        results.append({"image": str(path), "top": [{"label": labels[i], "probability": float(probs[i])} for i in order]})
    return results
