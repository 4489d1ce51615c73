"""The deployment bundle, predict/verify, and the report page in a real browser (slow)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgecompress.cli import main
from edgecompress.data.datasets import load_digits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["ort-cpu", "openvino-cpu"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    code = main(["build", "--target", request.param, "--latency", "50ms", "--model", "lcnet_050",
                 "--out", str(out), "--archive"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def test_images(tmp_path_factory):
    """Ten digits from the test split as PNG files, as a user would have them."""
    from PIL import Image

    data = load_digits(32)
    x, y = data.split("test")
    pre = data.preprocess
    root = tmp_path_factory.mktemp("images")
    paths, labels = [], []
    for i in range(0, 100, 10):
        img = (x[i].transpose(1, 2, 0) * np.asarray(pre.std) + np.asarray(pre.mean)) / pre.scale
        path = root / f"digit{i}.png"
        Image.fromarray(np.round(img).clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
        labels.append(str(y[i]))
    return paths, labels


def _cli_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_bundle_contents(run):
    bundle = run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert report["artifact"] == f"bundle/{manifest['artifact']}"
    for key in ("target", "runtime", "runtime_version", "precision", "tool_version", "command"):
        assert manifest[key]
    assert "edgecompress build" in manifest["command"] and "--latency 50ms" in manifest["command"]
    assert set(manifest["files"]) == {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert (bundle / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    pre = json.loads((bundle / "preprocess.json").read_text())
    assert pre["image_size"] == 32 and pre["layout"] == "NCHW" and pre["color_order"] == "RGB"
    # The inference threads the latency was measured on ship with the artifact.
    threads = json.loads((bundle / "runtime.json").read_text())["threads"]
    chosen = next(c for c in report["candidates"] if c["id"] == report["choice_id"])
    assert threads == report["measured"]["threads"] == chosen["measured"]["threads"] == chosen["predicted"]["premeasured_threads"]
    assert threads in (None, 1)
    with tarfile.open(run / "bundle.tar.gz") as tar:
        assert "bundle/manifest.json" in tar.getnames()


def test_predict_and_python_example_agree_from_a_copy(run, test_images, tmp_path, capsys):
    """The bundle, copied elsewhere, works from its own files: predict and the example agree."""
    copy = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(run / "bundle", copy)
    paths, labels = test_images
    results = _cli_json(capsys, "predict", str(copy), *map(str, paths), "--json", "--top-k", "2")
    predicted = [r["top"][0]["label"] for r in results]
    assert sum(p == t for p, t in zip(predicted, labels)) >= 8  # lcnet_050 is 98.6% accurate
    example = next(copy.glob("infer_*.py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(example), *map(str, paths)], cwd=tmp_path, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    example_labels = [line.split("\t")[1] for line in proc.stdout.splitlines()]
    assert example_labels == predicted
    assert "edgecompress" not in example.read_text().split('"""', 2)[2]  # the example imports nothing of ours


def test_python_example_runs_on_the_threads_of_runtime_json(run, test_images, tmp_path):
    """The example reads runtime.json's threads, and one thread gives the same answers as the runtime's own choice
    (that the setting reaches the runtime: test_premeasure's runner test)."""
    paths, _ = test_images
    outputs = {}
    for threads in (None, 1):
        copy = tmp_path / f"bundle-{threads}"
        shutil.copytree(run / "bundle", copy)
        (copy / "runtime.json").write_text(json.dumps({"threads": threads}))
        example = next(copy.glob("infer_*.py"))
        proc = subprocess.run([sys.executable, str(example), *map(str, paths[:3])], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        outputs[threads] = proc
    assert outputs[None].returncode == 0 and outputs[1].returncode == 0, outputs[1].stderr
    assert outputs[1].stdout == outputs[None].stdout and outputs[1].stdout.count("\n") == 3


def test_verify_ok(run, capsys):
    assert main(["verify", str(run / "bundle")]) == 0
    assert "files match the manifest" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "labels.txt").write_text("tampered\n"), "labels.txt does not match its sha256"),
    (lambda b: (b / "preprocess.json").unlink(), "incomplete: preprocess.json is missing"),
    (lambda b: (b / "manifest.json").unlink(), "has no manifest.json"),
    (lambda b: (b / "manifest.json").write_text("{not json"), "manifest.json is malformed"),
])
def test_verify_and_predict_refuse_a_damaged_bundle(run, tmp_path, capsys, damage, message, test_images):
    copy = tmp_path / "bundle"
    shutil.copytree(run / "bundle", copy)
    damage(copy)
    for argv in (["verify", str(copy)], ["predict", str(copy), str(test_images[0][0])]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_verify_catches_a_model_that_does_not_load(run, tmp_path, capsys):
    """Even with a manifest re-hashed to match, a corrupt artifact fails to load."""
    from edgecompress.core.fsutil import sha256_file

    copy = tmp_path / "bundle"
    shutil.copytree(run / "bundle", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    artifact = copy / manifest["artifact"]
    artifact.write_bytes(artifact.read_bytes()[:200])
    manifest["files"][artifact.name] = sha256_file(artifact)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 2
    assert "does not load" in capsys.readouterr().err


def test_cpp_example_compiles(run):
    bundle = run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest["runtime"] != "onnxruntime":
        # Not an absence to skip over: OpenVINO bundles ship the Python example and no C++ one.
        assert not any(name.endswith(".cpp") for name in manifest["files"]) and "infer_openvino.py" in manifest["files"]
        return
    assert "infer_onnxruntime.cpp" in manifest["files"]
    root = os.environ.get("ONNXRUNTIME_ROOT")
    if not root or not (Path(root) / "include" / "onnxruntime_cxx_api.h").exists():
        pytest.skip("ONNX Runtime's C++ headers are not here: they ship in its release archives, which no "
                    "package registry reachable here carries; set ONNXRUNTIME_ROOT to an unpacked archive")
    subprocess.run(["g++", "-std=c++17", str(bundle / "infer_onnxruntime.cpp"), f"-I{root}/include",
                    f"-L{root}/lib", "-lonnxruntime", "-o", str(run / "infer")], check=True)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_chromium(run, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    page = (run / "report.html").as_uri()
    shot = tmp_path / "report.png"
    proc = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1000,1600", page],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    console_errors = [l for l in proc.stderr.splitlines() if "CONSOLE" in l and ("rror" in l or "Uncaught" in l)]
    assert console_errors == []
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<circle") >= 10 and "budget 50 ms" in dom and "Per-class accuracy" in dom
    # The screenshot is not blank: the plot and tables put many distinct colours on it.
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50


def test_tensorrt_examples_compile_where_tensorrt_is():
    """The engine examples need TensorRT and CUDA (a Jetson, or a GPU machine with TensorRT installed)."""
    from edgecompress.deploy.bundle import TEMPLATES

    headers = [Path(p) for p in ("/usr/include/aarch64-linux-gnu", "/usr/include/x86_64-linux-gnu", "/usr/include")]
    include = next((h for h in headers if (h / "NvInfer.h").exists()), None)
    if include is None or not Path("/usr/local/cuda/include/cuda_runtime_api.h").exists():
        pytest.skip("TensorRT and CUDA headers are not on this machine (no GPU here): the TensorRT examples "
                    "are compiled on the device")
    subprocess.run(["g++", "-std=c++17", "-fsyntax-only", str(TEMPLATES / "infer_tensorrt.cpp"), f"-I{include}",
                    "-I/usr/local/cuda/include"], check=True)
