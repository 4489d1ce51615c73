"""The runtime contract: every registered runtime exports, quantizes, runs, names its files and examples, and
benchmarks here where it can; and no code outside ``runtimes/`` asks for a runtime by name."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgecompress.core.errors import EdgecompressError
from edgecompress.runtimes.base import Runtime, export_onnx
from edgecompress.targets import RUNTIMES, get_target, known_runtimes, list_targets, runtime_class

TEMPLATES = Path(__file__).resolve().parents[1] / "edgecompress" / "deploy" / "bundle_templates"


def _target_for(runtime_name):
    return next(get_target(t) for t in list_targets() if get_target(t).runtime_name == runtime_name)


@pytest.mark.parametrize("name", sorted(known_runtimes()))
def test_runtime_contract(name, tmp_path):
    runtime = _target_for(name).runtime()
    assert isinstance(runtime, Runtime) and runtime.name == name
    for example in runtime.bundle_examples:
        assert (TEMPLATES / example).is_file(), example
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    onnx_path = export_onnx(model, (1, 3, 16, 16), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    for precision in ("fp32", "int8"):
        out = tmp_path / precision
        out.mkdir()
        artifact = runtime.export(onnx_path, "fp32", out)
        if precision == "int8":
            (out / "q").mkdir()
            artifact = runtime.quantize(artifact, x, out / "q")
        assert artifact.name == runtime.artifact_name
        assert all(f.is_file() for f in runtime.artifact_files(artifact))
        logits = runtime.session(artifact)(x)
        assert logits.shape == (3, 4) and np.isfinite(logits).all()
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    fp32 = runtime.session(tmp_path / "fp32" / runtime.artifact_name)(x)
    assert np.allclose(fp32, reference, atol=1e-2)
    assert isinstance(runtime.deploy_notes(artifact, "int8", (1, 3, 16, 16)), dict)
    if runtime.unavailable_here() is None:
        result = runtime.benchmark(artifact, warmup=1, runs=5)
        assert result["latency_ms_median"] > 0 and result["runs"] == 5
    try:
        times = runtime.node_times(artifact, (1, 3, 16, 16), runs=3)
    except EdgecompressError as exc:
        assert "no per-kernel profiler" in str(exc)
    else:
        assert times and all(t >= 0 for t in times.values())


def test_runtime_classes_import_lazily():
    """Listing targets never imports a runtime's class; asking for one does."""
    for name in RUNTIMES:
        assert runtime_class(name).name == name


def test_no_code_outside_runtimes_branches_on_a_runtime_name():
    package = Path(__file__).resolve().parents[1] / "edgecompress"
    names = "|".join(re.escape(n) for n in RUNTIMES)
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = [f"{p.relative_to(package)}:{i}" for p in package.rglob("*.py") if "runtimes" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_signals_are_handled_after_openvino_plugins_are_freed_in_order():
    """Each OpenVINO Core's CPU plugin maps a signal stack onto the thread and, when destroyed, unmaps it and puts
    back the one it found if its own is still current: two plugins freed in the order they were made leave the thread
    on an unmapped stack, and the next signal Python handles is a segmentation fault (CI's exit 139, from the SIGCHLD
    of a subprocess once torch's DataLoader had set a handler). keep_signal_stack, called after plugins are made,
    puts the thread on a stack of ours that their destructors leave alone. Run in a child: a fault fails this test
    alone."""
    import subprocess
    import sys

    code = ("import gc, os, signal, openvino as ov\n"
            "from edgecompress.core.sigstack import keep_signal_stack, current_signal_stack\n"
            "first, second = ov.Core(), ov.Core()\n"
            "first.get_property('CPU', 'FULL_DEVICE_NAME'); second.get_property('CPU', 'FULL_DEVICE_NAME')\n"
            "keep_signal_stack(); ours = current_signal_stack()\n"
            "del first; gc.collect(); del second; gc.collect()\n"
            "assert current_signal_stack() == ours\n"
            "signal.signal(signal.SIGUSR1, lambda *_: print('handled'))\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "handled" in proc.stdout, (proc.returncode, proc.stderr[-500:])


def test_a_graph_openvino_cannot_convert_is_named_in_one_line(tmp_path):
    """OpenVINO's converter opens with an assertion's location; the line a user sees names what it could not
    convert (eSE-VoVNet at 32x32: a 3x3 max-pool meets a 2x2 map)."""
    import timm

    from edgecompress.core.errors import one_line

    torch.manual_seed(0)
    model = timm.create_model("ese_vovnet19b_dw", pretrained=False, num_classes=10).eval()
    onnx_path = export_onnx(model, (1, 3, 32, 32), tmp_path / "m.onnx")
    (tmp_path / "fp32").mkdir()
    with pytest.raises(Exception) as info:  # OpenVINO raises its own types
        get_target("openvino-cpu").runtime().export(onnx_path, "fp32", tmp_path / "fp32")
    line = one_line(info.value)
    assert line.startswith("OpenVINO cannot convert ") and "MaxPool" in line and "\n" not in line
    assert one_line(ValueError("first\nsecond")) == "first" and one_line(KeyError()) == "KeyError"
